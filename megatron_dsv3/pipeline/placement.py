"""Which model stage each (pipeline rank, chunk) holds under DualPipe / DualPipeV, and building those chunks.

DeepSeek-V3 §3.2.1:
  DualPipe   the model is cut into PP stages; rank r holds stage r of direction 0 (chunk 0) and a second copy
             of stage PP-1-r for direction 1 (chunk 1). Two parameter copies: the copies' gradients are summed
             across the rank pair (r, PP-1-r) before the optimizer step, so they stay identical.
  DualPipeV  the model is cut into 2*PP stages laid out in a V: rank r holds stage r (chunk 0) and stage
             2*PP-1-r (chunk 1). One parameter copy; rank 0 holds both the embedding (stage 0) and the output
             head + MTP (last stage).

Every stage is a megatron-core GPTModel: the first stage has the embedding (pre_process), the last one the
final norm, output head and MTP (post_process; MTP uses the word embedding of stage 0, which every rank holding
the last stage also holds: `DualStage.share_embedding`; with --no-share-mtp-embedding MTP keeps a copy whose
gradient the executor sums with stage 0's). Layers are numbered globally, so the layout-independent init and the checkpoint
keys are those of the single-process model.
"""

import argparse
import copy
from typing import List, Tuple

from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dsv3.models.spec import decoder_block_spec, mtp_modules_spec
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher

DUAL_SCHEDULES = ("dualpipe", "dualpipev")


class StageView:
    """Stands in for a process group where megatron-core only asks for rank() and size(): the position of a
    chunk in its pipeline (GPTModel reads its layer offset and first/last-stage role from pg_collection.pp).
    StageView(0, 1) is a one-member group: megatron skips the collective (see dualpipe's finalize)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def add_dual_placement_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("DualPipe/DualPipeV placement")
    g.add_argument("--no-share-mtp-embedding", dest="share_mtp_embedding", action="store_false",
                   help="dualpipe/dualpipev: MTP keeps its own copy of the word embedding on a rank that also holds "
                        "stage 0 (the copies' gradients are summed) instead of sharing stage 0's (DeepSeek-V3 §3.2.3)")


def validate_dual_placement_args(args) -> None:
    """Raises ValueError (one line naming the flag and the fix); after the schedule is resolved."""
    if not args.share_mtp_embedding and (args.pipeline_schedule not in DUAL_SCHEDULES
                                         or not args.model_config.mtp_num_layers):
        raise ValueError("--no-share-mtp-embedding applies to --pipeline-schedule dualpipe or dualpipev with "
                         "--mtp-num-layers > 0 (elsewhere MTP's embedding is megatron-core's own); drop the flag")


def num_stages(schedule: str, pp_size: int) -> int:
    """Model stages of one pipeline: PP for DualPipe, 2*PP for DualPipeV."""
    _check_schedule(schedule)
    return 2 * pp_size if schedule == "dualpipev" else pp_size


def chunk_stages(schedule: str, pp_size: int, pp_rank: int) -> List[int]:
    """Stage index held by chunk 0 and chunk 1 of `pp_rank` (matches schedule_plan's `stage_of`)."""
    last = num_stages(schedule, pp_size) - 1
    return [pp_rank, last - pp_rank]


def stage_layers(num_layers: int, schedule: str, pp_size: int, stage: int) -> Tuple[int, int]:
    """(first global layer, layer count) of `stage`: layers split evenly over the stages (megatron-core places
    them itself when DualPipe's first/last stage is uneven)."""
    per_stage = num_layers // num_stages(schedule, pp_size)
    return stage * per_stage, per_stage


def validate_dual_pipeline(schedule: str, pp_size: int, num_layers: int, num_microbatches: int,
                           virtual_stages=None, uneven_first_last: bool = False,
                           batch_flags: str = "--global-batch-size") -> None:
    """One-line ValueError for a layout DualPipe/DualPipeV cannot run (the plan's rules included); a bad
    micro-batch count names `batch_flags` as the fix."""
    _check_schedule(schedule)
    flag = f"--pipeline-schedule {schedule}"
    if pp_size < 2:
        raise ValueError(f"{flag} needs --pipeline-model-parallel-size >= 2, got {pp_size}")
    if schedule == "dualpipe" and pp_size % 2:
        raise ValueError(f"{flag} needs an even --pipeline-model-parallel-size (two half-pipelines meet in the "
                         f"middle), got {pp_size}; use dualpipev for odd sizes")
    if virtual_stages:
        raise ValueError(f"{flag} places two chunks per rank itself; drop --num-layers-per-virtual-pipeline-stage")
    _check_layer_split(schedule, pp_size, num_layers, uneven_first_last)
    need_even = schedule == "dualpipe"
    if num_microbatches < 2 * pp_size or (need_even and num_microbatches % 2):
        rule = "an even number" if need_even else "a number"
        raise ValueError(f"{flag} needs {rule} of micro-batches >= 2 x --pipeline-model-parallel-size = "
                         f"{2 * pp_size}, got {num_microbatches}; raise {batch_flags}")


def _check_layer_split(schedule: str, pp_size: int, num_layers: int, uneven_first_last: bool) -> None:
    flag = f"--pipeline-schedule {schedule}"
    if uneven_first_last and schedule == "dualpipev":
        raise ValueError(f"{flag} splits layers evenly over its 2 x PP stages; drop "
                         "--decoder-first/last-pipeline-num-layers (dualpipe takes them)")
    stages = num_stages(schedule, pp_size)
    # DualPipe's PP stages split like 1F1B's, uneven first/last stage included (checked with those flags)
    if num_layers % stages and not uneven_first_last:
        raise ValueError(f"--num-layers {num_layers} must be divisible by the {stages} stages of {flag} with "
                         f"--pipeline-model-parallel-size {pp_size}")


class DualStage(GPTModel):
    """A chunk of DualPipe/DualPipeV. The one holding the last stage (output head and MTP) shares the word
    embedding of the stage-0 chunk on the same rank (DeepSeek-V3 §3.2.3: MTP's embedding and output head are
    physically shared with the main model): one parameter, one gradient (autograd accumulates both uses), one
    optimizer state, stored once in checkpoints (under stage 0's key, as at PP=1)."""

    def share_embedding(self, owner: GPTModel) -> None:
        """Use `owner`'s embedding for MTP; it is not registered as a submodule here, so parameters(), the DDP
        buffer, the optimizer and the checkpoint see it once, in `owner`."""
        del self._modules["embedding"]
        object.__setattr__(self, "embedding", owner.embedding)  # nn.Module.__setattr__ would register it

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        # GPTModel ties the MTP stage's own embedding copy into the checkpoint; a shared one has no copy to tie
        mtp_process, self.mtp_process = self.mtp_process, self.mtp_process and "embedding" in self._modules
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.mtp_process = mtp_process


class MirroredStage(DualStage):
    """DualPipe's second copy of a stage (chunk 1 of rank r mirrors chunk 0 of rank PP-1-r): the same checkpoint
    keys, every entry a non-main replica. A checkpoint stores the stage once (from chunk 0) and both copies load
    it; the copies' optimizer states follow their parameters' replica ids, so they are stored once too (they
    stay equal because the executor sums the copies' gradients)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for entry in nested_values(state):
            if hasattr(entry, "replica_id"):
                replica = entry.replica_id
                entry.replica_id = (1, *(replica if isinstance(replica, tuple) else (replica,)))
        return state


def build_stage(config, vocab_size: int, max_sequence_length: int, stage: int, stages: int,
                token_dispatcher=AllToAllTokenDispatcher, model_class=GPTModel) -> GPTModel:
    """GPTModel for `stage` of a `stages`-stage pipeline. megatron-core places layers by (pp rank, pp size):
    it reads them here from a per-stage config copy and a StageView in pg_collection.pp, so layer numbers,
    the final norm, the embedding/head roles and the checkpoint keys come out global."""
    stage_config = copy.copy(config)
    stage_config.pipeline_model_parallel_size = stages
    stage_config.virtual_pipeline_model_parallel_size = None
    groups = ProcessGroupCollection.use_mpu_process_groups()
    groups.pp = StageView(stage, stages)
    groups.embd = None  # no embedding all-reduce at construction; the executor ties the copies
    groups.pos_embd = None
    last = stage == stages - 1
    return model_class(
        config=stage_config,
        transformer_layer_spec=decoder_block_spec(stage_config, stage, None, token_dispatcher),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=stage == 0,
        post_process=last,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        mtp_block_spec=mtp_modules_spec(config, token_dispatcher) if last and config.mtp_num_layers else None,
        pg_collection=groups,
    )


def build_dual_chunks(config, vocab_size: int, max_sequence_length: int, schedule: str, *, pp_rank=None,
                      pp_size=None, token_dispatcher=AllToAllTokenDispatcher) -> List[GPTModel]:
    """This rank's two chunks [chunk 0, chunk 1]. DualPipe's chunk 1 is a copy of another rank's chunk 0 (a
    MirroredStage): its parameters are marked `shared` so the gradient norm counts every weight once."""
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if pp_size is None:
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    stages = num_stages(schedule, pp_size)
    uneven = bool(config.num_layers_in_first_pipeline_stage or config.num_layers_in_last_pipeline_stage)
    _check_layer_split(schedule, pp_size, config.num_layers, uneven)
    config = copy.copy(config)
    config.split_weight_grad = True  # the linears' weight-gradients can wait for W ops (weight_grad_store)
    classes = [DualStage, MirroredStage if schedule == "dualpipe" else DualStage]
    chunks = [build_stage(config, vocab_size, max_sequence_length, stage, stages, token_dispatcher, model_class)
              for stage, model_class in zip(chunk_stages(schedule, pp_size, pp_rank), classes)]
    if schedule == "dualpipe":
        for param in chunks[1].parameters():
            param.shared = True
    first, last = sorted(chunks, key=lambda c: c.post_process)  # every rank holding one end holds both
    if first.pre_process and last.post_process and last.mtp_process and config.share_mtp_embedding:
        last.share_embedding(first)
    return chunks


def embedding_copies(chunks) -> List:
    """The word-embedding parameters a rank's chunks own (through DDP wrappers; a shared one is owned by stage 0):
    two when stage 0 and an unshared MTP embedding (--no-share-mtp-embedding) sit on this rank."""
    modules = [getattr(c, "module", c) for c in chunks]
    return [m.embedding.word_embeddings.weight for m in modules if "embedding" in m._modules]


def _check_schedule(schedule: str) -> None:
    if schedule not in DUAL_SCHEDULES:
        raise ValueError(f"--pipeline-schedule {schedule!r} is not one of {DUAL_SCHEDULES}")
