"""Adam/AdamW with its moments stored in BF16 (or FP32) and FP32 master weights, in plain torch.

It has the interface of Transformer Engine's FusedAdam that megatron-core's precision-aware distributed
optimizer drives (`--use-precision-aware-optimizer`): the constructor's `adam_w_mode`, `master_weights`,
`master_weight_dtype`, `exp_avg_dtype`, `exp_avg_sq_dtype`, `use_decoupled_grad`; `initialize_state`,
`get_unscaled_state` / `set_scaled_state`; the states 'exp_avg', 'exp_avg_sq', 'master_param'. Where TE is
absent, `platform.use_torch_precision_aware_adam` puts it in FusedAdam's place.

Step t of a parameter with gradient g (`.decoupled_grad` when use_decoupled_grad) and FP32 master weight w,
in FP32 with the moments m, v upcast from their stored dtype (the order of operations of torch.optim.AdamW):
    AdamW: w ← w·(1 − lr·λ)            Adam: g ← g + λ·w
    m ← m + (1 − β1)·(g − m)            v ← β2·v + (1 − β2)·g²
    w ← w − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
then m, v are stored back in their dtype (round to nearest even) and the parameter gets w in its own dtype.
An FP32 parameter is its own master weight. BF16 has FP32's exponent range, so it needs no scale factor: the
"unscaled" state is the stored tensor itself, and a checkpoint keeps the moments in BF16 (TE's FusedAdam
hands megatron-core an FP32 copy). `step` is a per-parameter FP32 0-dim tensor as in torch.optim.AdamW, the
form megatron-core's distributed optimizer checkpoints when neither TE nor Apex is installed.
"""

import torch

STATE_DTYPES = (torch.float32, torch.bfloat16)
MOMENTS = ("exp_avg", "exp_avg_sq")


class PrecisionAwareAdam(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, *, adam_w_mode=True,
                 master_weights=False, master_weight_dtype=torch.float32, exp_avg_dtype=torch.float32,
                 exp_avg_sq_dtype=torch.float32, use_decoupled_grad=False):
        for name, dtype in (("exp_avg_dtype", exp_avg_dtype), ("exp_avg_sq_dtype", exp_avg_sq_dtype)):
            if dtype not in STATE_DTYPES:
                raise ValueError(f"PrecisionAwareAdam stores {name} in fp32 or bf16, not {dtype}")
        if master_weight_dtype != torch.float32:
            raise ValueError(f"PrecisionAwareAdam keeps fp32 master weights, not {master_weight_dtype}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.adam_w_mode = adam_w_mode
        self.master_weights = master_weights
        self.use_decoupled_grad = use_decoupled_grad
        self.state_dtypes = {"exp_avg": exp_avg_dtype, "exp_avg_sq": exp_avg_sq_dtype,
                             "master_param": master_weight_dtype}

    def initialize_state(self, param) -> None:
        state = self.state[param]
        state["step"] = torch.zeros((), dtype=torch.float32)
        for name in MOMENTS:
            state[name] = torch.zeros_like(param, dtype=self.state_dtypes[name])
        if param.dtype == torch.float32:
            state["master_param"] = param
        elif self.master_weights:
            state["master_param"] = param.detach().float()

    def get_unscaled_state(self, param, state_name: str) -> torch.Tensor:
        return self.state[param][state_name]

    def set_scaled_state(self, param, state_name: str, value: torch.Tensor) -> None:
        if state_name == "padding":  # megatron-core's dp_reshardable load passes its bucket-entry flag along
            return
        state = self.state[param]
        if not state:
            self.initialize_state(param)
        if state_name == "step":
            state["step"] = value.detach().to(torch.float32).clone()
        else:
            state[state_name].copy_(value)

    def load_state_dict(self, state_dict) -> None:
        """torch's load casts every state to its parameter's dtype; put each back in its own."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                for name in MOMENTS:
                    state[name] = state[name].to(self.state_dtypes[name])
                if param.dtype == torch.float32 and "master_param" in state:
                    with torch.no_grad():
                        param.copy_(state["master_param"])
                    state["master_param"] = param

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for param in group["params"]:
                state = self.state[param]
                if not state:
                    self.initialize_state(param)
                grad = getattr(param, "decoupled_grad", None) if self.use_decoupled_grad else param.grad
                if grad is None:
                    continue
                state["step"] += 1
                t = state["step"].item()
                weight = state.get("master_param")
                weight = param.float() if weight is None else weight
                grad = grad.float()
                exp_avg, exp_avg_sq = (state[name].float() for name in MOMENTS)
                if decay != 0:
                    if self.adam_w_mode:
                        weight.mul_(1 - lr * decay)
                    else:
                        grad = grad.add(weight, alpha=decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                weight.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))
                for name, value in zip(MOMENTS, (exp_avg, exp_avg_sq)):
                    if value is not state[name]:
                        state[name].copy_(value)
                if weight is not param:
                    param.copy_(weight)
        return loss
