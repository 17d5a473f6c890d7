from megatron_dsv3.third_party_warnings import silence as _silence_third_party_warnings

_silence_third_party_warnings()  # before any megatron-core import: some of them warn while importing
