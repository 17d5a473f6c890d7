"""Expert load over training: tokens routed to each routed expert of each MoE layer (MTP's included) and the
aux-loss-free bias b_i (moe/router.py), gathered with one all-reduce per log interval, drawn as a PNG beside
the checkpoints (`SAVE/expert_load.png`, at each save and at the end) and sent to TensorBoard (per-layer
histograms at each log interval, the picture at each save and at the end).

Over an interval of I iterations with global batch B and sequence length S, each layer routes B·S·I tokens
to K experts each: its counts sum to B·S·I·K. Balanced load is B·S·I·K/E per expert; max/mean load is at
most E/K (every token on the same K experts)."""

import os

import torch
import torch.distributed as dist

from megatron_dsv3.moe.router import DSv3Router

PNG_NAME = "expert_load.png"
DPI = 100


def moe_layer_numbers(model_config) -> list:
    """Global (1-based) layer numbers that route tokens: the MoE decoder layers, then the MTP layers
    (megatron-core numbers MTP layer i as num_layers + i)."""
    if not model_config.num_experts:
        return []
    layers = [i + 1 for i, is_moe in enumerate(model_config.moe_layer_pattern) if is_moe]
    return layers + [model_config.num_layers + i + 1 for i in range(model_config.mtp_num_layers or 0)]


def layer_label(layer_number: int, num_layers: int) -> str:
    return f"mtp{layer_number - num_layers}" if layer_number > num_layers else f"layer{layer_number}"


def _heat_map_size(num_layers: int, num_experts: int) -> tuple:
    """Inches: a quarter inch per cell up to 12 inches a side (DeepSeek-V3: 62 rows × 256 columns)."""
    return 1.5 + min(0.25 * num_experts, 12.0), 1.0 + min(0.25 * num_layers, 12.0)


def figure_size(num_layers: int, num_experts: int) -> tuple:
    """(width, height) in inches: two heat maps [layers × experts] side by side above a 3-inch line plot."""
    width, height = _heat_map_size(num_layers, num_experts)
    return 2 * width + 1.5, height + 3.0


def _routers(chunks):
    return [m for c in chunks for m in c.modules() if isinstance(m, DSv3Router)]


class ExpertLoad:
    """Accumulated on device by the routers (DSv3Router.interval_tokens_per_expert); `gather` is collective."""

    def __init__(self, args, chunks, is_writer: bool):
        self.args = args
        self.layers = moe_layer_numbers(args.model_config)
        self.num_experts = args.model_config.num_experts or 0
        self.topk = args.model_config.moe_router_topk
        # DualPipe's mirrored copy of a stage (weights marked `shared`) holds the same, summed counts
        self.routers = {r.layer_number: r for r in _routers(chunks) if not getattr(r.weight, "shared", False)}
        self.is_writer = is_writer
        self.total = None  # [L, E] tokens since this run started (writer)
        self.history = []  # (iteration, max/mean load per layer) (writer)
        self.bias = None  # [L, E] the bias at the last gather (writer)
        self.last_gathered = self.last_drawn = None

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def gather(self, iteration: int):
        """Tokens per expert [L, E] since the last gather and the current bias [L, E], on the writer (None
        elsewhere); resets the routers' interval counts."""
        if not self.enabled or self.last_gathered == iteration:
            return None
        self.last_gathered = iteration
        device = torch.cuda.current_device()  # NCCL reduces GPU tensors only
        # rows: tokens, bias, number of bias replicas (over DP and TP)
        stacked = torch.zeros(3, len(self.layers), self.num_experts, dtype=torch.float64, device=device)
        for row, layer in enumerate(self.layers):
            router = self.routers.get(layer)
            if router is None:
                continue
            stacked[0, row] = router.interval_tokens_per_expert.double()
            stacked[1, row] = router.expert_bias.double()
            stacked[2, row] = 1
            router.interval_tokens_per_expert.zero_()
        # every token is routed once per layer: by its DP rank, and with TP (which MoE runs only with sequence
        # parallelism, arguments.py) by the TP rank holding its part of the sequence
        dist.all_reduce(stacked)
        if not self.is_writer:
            return None
        tokens = stacked[0].cpu()
        self.bias = (stacked[1] / stacked[2].clamp(min=1)).cpu()
        self.total = tokens if self.total is None else self.total + tokens
        self.history.append((iteration, (tokens.max(-1).values / tokens.mean(-1).clamp(min=1e-9)).tolist()))
        return tokens, self.bias

    def labels(self) -> list:
        return [layer_label(n, self.args.model_config.num_layers) for n in self.layers]

    def to_tensorboard(self, writer, iteration: int, tokens, bias) -> None:
        for label, counts, b in zip(self.labels(), tokens, bias):
            # one sample per expert: the histogram's sum is the layer's routed tokens (B·S·I·K)
            writer.add_histogram(f"expert_load/{label}", counts, iteration)
            writer.add_histogram(f"expert_bias/{label}", b, iteration)

    def figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels, experts = self.labels(), self.num_experts
        fig = plt.figure(figsize=figure_size(len(labels), experts), dpi=DPI)
        grid = fig.add_gridspec(2, 2, height_ratios=[_heat_map_size(len(labels), experts)[1], 2.0])
        share = self.total / self.total.sum(-1, keepdim=True).clamp(min=1) * experts
        for col, (data, title, cmap) in enumerate((
            (share, "tokens per expert / balanced share (this run)", "viridis"),
            (self.bias, "expert bias b_i (selection only)", "coolwarm"),
        )):
            ax = fig.add_subplot(grid[0, col])
            image = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_xlabel("expert", fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=6)
            ax.tick_params(axis="x", labelsize=6)
            fig.colorbar(image, ax=ax)
        ax = fig.add_subplot(grid[1, :])
        iterations = [i for i, _ in self.history]
        for row, label in enumerate(labels):
            ax.plot(iterations, [ratios[row] for _, ratios in self.history], label=label, linewidth=1)
        ax.axhline(experts / self.topk, color="gray", linestyle="--", linewidth=0.8, label="ceiling E/K")
        ax.set_xlabel("iteration", fontsize=7)
        ax.set_ylabel("max/mean tokens per expert", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, ncol=min(len(labels) + 1, 8))
        fig.subplots_adjust(left=0.08, right=0.97, top=0.95, bottom=0.07, hspace=0.2, wspace=0.25)
        return fig

    def draw(self, iteration: int, tensorboard=None):
        """The PNG beside the checkpoints (if --save) and the TensorBoard image; collective (gather)."""
        gathered = self.gather(iteration)
        if gathered is not None and tensorboard is not None:
            self.to_tensorboard(tensorboard, iteration, *gathered)
        if not self.is_writer or self.total is None or not (self.args.save or tensorboard is not None):
            return None
        path = os.path.join(self.args.save, PNG_NAME) if self.args.save else None
        if self.last_drawn == iteration:
            return path
        self.last_drawn = iteration
        import matplotlib.pyplot as plt

        fig = self.figure()
        if path:
            os.makedirs(self.args.save, exist_ok=True)
            fig.savefig(path + ".tmp.png", dpi=DPI)
            os.replace(path + ".tmp.png", path)
        if tensorboard is not None:
            tensorboard.add_figure("expert_load", fig, iteration, close=False)
        plt.close(fig)
        return path
