"""Host synchronisations in a training forward + backward of the model: on GPUs each `.item()`, `.tolist()`,
data-dependent `nonzero` or unsized `repeat_interleave` of a device tensor stalls the launch queue. The
dispatchers may sync once per dispatch stage (the all-to-all split sizes), the per-expert loop once to split its
rows; nothing else in the model may. With one expert-parallel rank nothing crosses: the flat dispatcher keeps the
counts on the device, so grouped experts run the MoE layer without any host sync."""

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_dsv3.training.initialize import initialize_single_process
from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.moe.moe_layer import DSv3MoELayer
from megatron_dsv3.moe.hierarchical_dispatcher import HierarchicalTokenDispatcher
from megatron_dsv3.moe.topology import initialize_ep_topology
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher, TrafficCounter

SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__bool__,
           torch.Tensor.__int__, torch.Tensor.__float__}


class CountHostSyncs(TorchFunctionMode):
    """Counts the calls that read device data on the host, by calling function; `host` tensors (made on the
    host from counts already read) are not device data."""

    def __init__(self, host=()):
        super().__init__()
        self.calls, self.host = collections.Counter(), host

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        unsized = func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs \
            and len(args) > 1 and isinstance(args[1], torch.Tensor)
        if (func in SYNCING or unsized) and not any(args[0] is t() for t in self.host):
            self.calls[func.__name__] += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def single_process():
    initialize_single_process()


@pytest.mark.parametrize("dispatcher, grouped, syncs", [(AllToAllTokenDispatcher, False, 1),
                                                        (AllToAllTokenDispatcher, True, 0),
                                                        (HierarchicalTokenDispatcher, False, 2)],
                         ids=["flat-loop", "flat-grouped", "hierarchical-loop"])
def test_host_syncs_per_moe_layer(single_process, dispatcher, grouped, syncs):
    cfg = get_preset("tiny")
    if dispatcher is HierarchicalTokenDispatcher:
        initialize_ep_topology()  # one rank = one node
    model = build_model(build_transformer_config(cfg, moe_grouped_gemm=grouped), cfg.vocab_size, 32,
                        pre_process=True, post_process=True, pp_rank=0, token_dispatcher=dispatcher)
    dispatchers = [m.token_dispatcher for m in model.modules() if isinstance(m, DSv3MoELayer)]
    assert all(isinstance(d, dispatcher) for d in dispatchers)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand_as(tokens)
    # the hierarchical dispatcher's rows per expert are made on the host from its second stage's counts; the flat
    # one's (one EP rank) are the device counts, which the per-expert loop reads (its one sync)
    hierarchical = dispatcher is HierarchicalTokenDispatcher
    host = [lambda d=d: getattr(d, "tokens_per_expert", None) for d in dispatchers] if hierarchical else []
    with CountHostSyncs(host) as counter:
        loss = model(tokens, positions, None, labels=torch.roll(tokens, -1, 1)).float().mean()
        loss.backward()
    # every MoE layer dispatched (main model and MTP), each with `syncs` syncs and nothing else
    assert len(dispatchers) == sum(cfg.moe_layer_pattern) + cfg.mtp_num_layers
    assert sum(counter.calls.values()) == syncs * len(dispatchers), dict(counter.calls)


def test_nodes_per_token_peak_is_read_only_when_asked():
    traffic = TrafficCounter()
    traffic.observe_nodes_per_token(torch.tensor([1, 3, 2]))
    traffic.observe_nodes_per_token(torch.tensor([2]))
    assert traffic.max_nodes_per_token == 3
    traffic.reset()
    assert traffic.max_nodes_per_token == 0
