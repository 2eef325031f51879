"""Optimizers fused into a head's backward: ``facekernels.optim.SGD`` and ``facekernels.optim.AdamW``.

While one is attached to a head, the head's backward updates the weight one chunk of classes at a time, as soon
as that chunk's weight gradient exists (facekernels/_algorithm.py, step 4): ``head.weight.grad`` stays None, no
(C, d) gradient is ever allocated, and the update's pass over the weight and its state happens while the chunk
is in cache. ``step()`` then closes the step (AdamW's step count)::

    head = facekernels.ArcFace(512, num_classes)
    head_opt = facekernels.optim.SGD(head, lr=0.1, momentum=0.9, weight_decay=5e-4)
    backbone_opt = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(head_opt, 10)
    for x, y in loader:
        head(backbone(x), y).backward()  # updates head.weight
        head_opt.step()                  # closes the step
        backbone_opt.step()
        backbone_opt.zero_grad()
        scheduler.step()

Each is a real ``torch.optim.Optimizer`` over the head's weight: ``param_groups``, ``state_dict`` /
``load_state_dict`` and LR schedulers work unchanged, and the state keeps torch's names and layout (SGD:
``momentum_buffer``; AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``), so a checkpoint moves between the fused
optimizer and torch's on the same head. The update is torch's single-tensor ``SGD`` / ``AdamW`` formula, with
torch's own operations in torch's order on each chunk's rows: bit for bit the unfused update on the same
gradient wherever the kernels' vectorised / scalar split of an elementwise operation agrees, otherwise within
a float rounding.

What differs from an optimizer that reads ``.grad``:

* One backward per step. The update is applied in the backward, so gradients cannot be accumulated over
  several backwards: a second backward through the head before ``step()`` raises, and so does ``step()``
  without a backward through the head (in training mode). Gradient clipping of the head's weight is not
  possible either (the gradient never exists as a whole).
* ``lr`` (a float, or a 0-dim tensor: no host sync) is read when the backward runs: a scheduler's change made
  after ``step()`` applies from the next backward on, as with torch's optimizer.
* Frozen weights (``requires_grad=False``) and a backward through an eval-mode head update nothing (in eval
  mode the head is an ordinary head: its backward fills ``weight.grad``).
* Partial FC (``sample_rate < 1``): torch's optimizer on the sampled head sees a gradient of 0 on the unsampled
  rows, and still moves them (weight decay, momentum; AdamW's moments decay). The fused optimizer reproduces
  that exactly: after the sampled rows it updates the unsampled ones with a zero gradient, chunk by chunk.
* Non-finite gradients: the update of a chunk of rows whose gradient (after unscaling) holds a NaN or an Inf
  is skipped, which means that the chunk's rows of the weight and of the state keep their values exactly;
  every chunk is skipped when the loss's per-row inputs are not finite (a NaN loss). The other chunks of the
  same backward are updated, and AdamW's step count advances. ``last_found_inf`` (a 0-dim bool tensor, read
  without a sync) says whether the last backward skipped anything. A NaN never reaches the weights.
* GradScaler: pass ``grad_scaler=scaler``. The backward reads the scaler's current scale (a tensor, no sync),
  unscales each chunk's gradient by it (as ``scaler.unscale_`` would) and skips non-finite chunks as above;
  ``scaler.step(optimizer)`` then closes the step and hands the scaler the step's found-inf flag, so that
  ``scaler.update()`` backs off the scale. Unlike torch's skip of the whole step, the chunks updated before a
  non-finite chunk stay updated (the rest of the step cannot be undone without keeping a gradient). A
  ``scaler.step()`` on a fused optimizer built without the scaler raises: its update already ran with the
  scaled gradient.
* ``master_weights=True`` (bfloat16 / float16 weights): the update runs on a float32 copy of the weight kept in
  the state (``master_weight``) with float32 state tensors, and the weight receives the rounded copy.

Chunks of the update hold at most ``UPDATE_CHUNK_BYTES`` of the weight's rows (and a few temporaries of that size):
with the CPU backend the backward then runs one kernel call per chunk instead of one for all the classes.
"""

from __future__ import annotations

import torch
from torch.optim.optimizer import _get_scalar_dtype

from . import _validate as V

# Bytes of the weight's rows per update chunk (float32 temporaries at least): in the L3 cache of a CPU, and
# small beside the weight (the peak memory beyond weight and state). Tests make it small.
UPDATE_CHUNK_BYTES = 4 * 2**20
# CPU tensors: a non-finite chunk is skipped by reading its flag on the host (no device is involved) and a finite
# one updated in place. Tests set False to run the GPU's no-sync path (copies committed by torch.where) on CPU.
HOST_SKIP_ON_CPU = True


def _take(tensor: torch.Tensor, index) -> torch.Tensor:
    return tensor[index] if isinstance(index, slice) else tensor.index_select(0, index)


def _put(tensor: torch.Tensor, index, value: torch.Tensor) -> None:
    if isinstance(index, slice):
        tensor[index].copy_(value)
    else:
        tensor.index_copy_(0, index, value)


def _minus_lr_times_(p: torch.Tensor, update: torch.Tensor, lr) -> None:
    """p -= lr * update: torch's ``p.add_(update, alpha=-lr)`` for a float lr; for a tensor lr its no-sync form
    (the ``addcmul_`` torch's SGD uses for a differentiable lr)."""
    if isinstance(lr, torch.Tensor):
        p.addcmul_(update, lr.to(p.device), value=-1)
    else:
        p.add_(update, alpha=-lr)


class _FusedOptimizer(torch.optim.Optimizer):
    """What SGD and AdamW share: attaching to the head, the per-backward protocol the algorithm calls
    (``_begin_backward``, ``_update_rows`` per chunk, ``_end_backward``), the non-finite guard and step()."""

    # GradScaler.step() calls step() directly, with grad_scale / found_inf attributes set (see step())
    _step_supports_amp_scaling = True

    def __init__(self, head, defaults: dict, master_weights: bool, grad_scaler):
        from .heads import _MarginHead

        if not isinstance(head, _MarginHead):
            raise TypeError(f"head must be a facekernels head (e.g. facekernels.ArcFace); got {type(head).__name__}")
        if head.backend == "reference":
            raise ValueError("a fused optimizer needs a fused backend; the head's backend is 'reference' (use "
                             "'auto', 'cpu' or 'triton')")  # fmt: skip
        if head._fused_optimizer is not None:
            raise ValueError("head already has a fused optimizer attached; call its detach() first")
        V.check_bool("master_weights", master_weights)
        weight = head.weight
        if master_weights and weight.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"master_weights=True is for bfloat16 or float16 weights; the head's weight is {weight.dtype}")
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler or None; got {type(grad_scaler).__name__}")
        super().__init__([weight], defaults)
        self._head, self._master, self._grad_scaler = head, master_weights, grad_scaler
        self._pending = False  # a backward through the head ran since the last step()
        self._updated = False  # ... and it updated the weight (False: frozen weight)
        self._rows = None  # Partial FC: the weight's rows the backward's chunks hold (None: all, in order)
        self._found_inf = None
        self._inv_scale = None
        head._fused_optimizer = self

    def detach(self) -> None:
        """Detach from the head: its backward fills ``weight.grad`` again (the state stays here)."""
        if self._head._fused_optimizer is self:
            self._head._fused_optimizer = None

    @property
    def last_found_inf(self) -> torch.Tensor | None:
        """0-dim bool tensor: whether the last backward skipped a chunk's update (a non-finite gradient); None
        before the first backward."""
        return self._found_inf

    # ------------------------------------------------------------------ what SGD / AdamW define

    def _check_group(self, group: dict) -> None:
        if group.get("maximize", False):
            raise ValueError("maximize=True is not supported by the fused optimizers")

    def _init_state(self, state: dict, work: torch.Tensor) -> None:
        """Create the state lazily (at the first backward, as torch's optimizer at its first step)."""

    def _begin_step(self, group: dict, state: dict) -> None:
        """Per-backward constants (read once, before the chunks)."""

    def _chunk_update(self, group: dict, grad: torch.Tensor, p: torch.Tensor, rows: dict) -> None:
        """Update one chunk of rows in place: ``p`` the weight's (or master's), ``rows`` the state tensors' by
        name; ``grad`` is this chunk's own (it may be overwritten)."""
        raise NotImplementedError

    def _close_step(self, state: dict) -> None:
        """step(): what torch's step() does besides the update (AdamW: the step count)."""

    # ------------------------------------------------------------------ the backward's protocol

    def _chunk_classes(self, features: int, subcenters: int, dtype: torch.dtype,
                       device: torch.device | None = None) -> int:
        """Classes per backward chunk: their rows within UPDATE_CHUNK_BYTES (at float32's size or more) on a CPU. On a
        GPU no bound of its own: the Triton backward's chunk is already sized for the L2 (D, W's rows and their
        dW), and the update's ~18 launches a chunk are per chunk, so a 4 MiB bound (2,048 classes at d = 512
        instead of 8,192) would quadruple them (bench/results/h100-model-2026-12-03: 8,802 update launches)."""
        if device is not None and device.type != "cpu":
            return 1 << 62
        size = max(torch.finfo(dtype).bits // 8, 4)
        return max(1, UPDATE_CHUNK_BYTES // (features * subcenters * size))

    def _param(self) -> torch.Tensor:
        return self.param_groups[0]["params"][0]

    def _work(self, param: torch.Tensor) -> torch.Tensor:
        """The tensor the update runs on: the weight, or its float32 master copy."""
        return self.state[param]["master_weight"] if self._master else param

    def _begin_backward(self, rows: torch.Tensor | None, need_dw: bool) -> None:
        if self._pending:
            raise RuntimeError(
                f"a second backward through the head before {type(self).__name__}.step(): the fused optimizer "
                "applied the first backward's update already, so gradients cannot be accumulated over several "
                "backwards; call step() after each backward (facekernels/optim.py)"
            )
        self._pending, self._updated = True, need_dw
        if not need_dw:
            return
        param = self._param()
        if self._head.weight is not param:
            raise RuntimeError("the head's weight is no longer the Parameter this optimizer was built with; build "
                               "a new optimizer for the head")  # fmt: skip
        group = self.param_groups[0]
        self._check_group(group)
        state = self.state[param]
        if self._master and "master_weight" not in state:
            state["master_weight"] = param.detach().float()
        self._init_state(state, self._work(param))
        self._rows = rows
        self._lr = group["lr"]
        self._found_inf = torch.zeros((), dtype=torch.bool, device=param.device)
        self._inv_scale = None
        scaler = self._grad_scaler
        if scaler is not None and scaler.is_enabled():
            if scaler._scale is None:
                raise RuntimeError("grad_scaler was given, but it has scaled no loss yet (scaler.scale(loss))")
            # GradScaler.unscale_'s reciprocal: in float64, then float32
            self._inv_scale = scaler._scale.double().reciprocal().float()
        self._begin_step(group, state)

    def _update_rows(self, start: int, end: int, dw: torch.Tensor, finite_rows: torch.Tensor) -> None:
        """Update the weight's rows [start, end) of the backward's w (through Partial FC's sampled rows) with
        their gradient ``dw`` (in w's dtype, which may be a promoted copy of the weight's)."""
        param = self._param()
        index = slice(start, end) if self._rows is None else self._rows[start:end]
        # what autograd hands the unfused optimizer: the gradient cast back to the weight's dtype
        grad = dw.to(param.dtype)
        if self._master:
            grad = grad.float()
        if self._inv_scale is not None:
            grad = grad * self._inv_scale.to(grad.device)
        self._apply(param, index, grad, finite_rows)

    def _end_backward(self, finite_rows: torch.Tensor) -> None:
        """Partial FC: the unsampled rows, updated with a zero gradient as torch's optimizer does."""
        rows, self._rows = self._rows, None
        if rows is None:
            return
        param = self._param()
        total = param.shape[0]
        count = total - rows.numel()  # host integers: no sync
        if count == 0:
            return
        sampled = torch.zeros(total, dtype=torch.int8, device=param.device)
        sampled[rows] = 1
        # the unsampled rows in ascending order: a stable sort puts the 0s first (nonzero() would sync)
        rest = torch.sort(sampled, stable=True).indices[:count]
        work = self._work(param)
        chunk = self._chunk_classes(param.shape[1], 1, work.dtype)  # bounded: no backward chunk sizes this pass
        for r0 in range(0, count, chunk):
            index = rest[r0 : r0 + chunk]
            self._apply(param, index, work.new_zeros(index.numel(), param.shape[1]), finite_rows)

    def _apply(self, param: torch.Tensor, index, grad: torch.Tensor, finite_rows: torch.Tensor) -> None:
        state = self.state[param]
        work = self._work(param)
        # one pass: any Inf or NaN makes the sum non-finite. Summed in float32 at least (float16's range would
        # overflow on a finite chunk); a finite float32 gradient summing past 3e38 is beyond any real head's
        finite = finite_rows & torch.isfinite(grad.sum(dtype=torch.promote_types(grad.dtype, torch.float32)))
        self._found_inf.logical_or_(~finite)
        targets = [work] + [value for name, value in state.items() if name not in ("step", "master_weight")]
        on_cpu = work.device.type == "cpu" and HOST_SKIP_ON_CPU
        if on_cpu:
            # a CPU flag is read without any device sync: a non-finite chunk is skipped outright, and a finite
            # one updated in place with torch's own in-place operations (no commit pass)
            if not bool(finite):
                return
            rows = [_take(t, index) for t in targets]  # views for a slice, copies for Partial FC's rows
        else:
            # no host sync on a GPU: the update runs on copies, committed by torch.where (skip = old values)
            rows = [t[index].clone() if isinstance(index, slice) else _take(t, index) for t in targets]
        names = [name for name in state if name not in ("step", "master_weight")]
        self._chunk_update(self.param_groups[0], grad, rows[0], dict(zip(names, rows[1:])))
        if not (on_cpu and isinstance(index, slice)):
            for target, new in zip(targets, rows):
                _put(target, index, new if on_cpu else torch.where(finite, new, _take(target, index)))
        if self._master:
            _put(param.data, index, _take(work, index).to(param.dtype))

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """Close the step whose update the last backward through the head applied (AdamW: the step count).

        Raises RuntimeError without such a backward since the last step(). ``closure`` is not supported (the
        update happens in the backward)."""
        if closure is not None:
            raise ValueError("closure is not supported by the fused optimizers: the update runs in the backward")
        # GradScaler.step() sets these attributes before it calls step()
        scaled = hasattr(self, "found_inf") or hasattr(self, "grad_scale")
        if scaled and self._grad_scaler is None:
            raise RuntimeError(
                f"GradScaler.step() on a fused {type(self).__name__} built without grad_scaler=: the backward "
                "already applied the update with the scaled gradient; build the optimizer with grad_scaler=scaler"
            )
        if not self._pending:
            raise RuntimeError(
                f"{type(self).__name__}.step() without a backward through the head since the last step(): the "
                "fused optimizer updates the weight in the head's backward (in training mode)"
            )
        self._pending = False
        if not self._updated:
            return None
        self._close_step(self.state[self._param()])
        scaler = self._grad_scaler
        if scaler is not None and scaler.is_enabled():
            # what scaler.update() reads to back off the scale (GradScaler's per-optimizer record)
            scaler._per_optimizer_states[id(self)]["found_inf_per_device"] = {
                self._found_inf.device: self._found_inf.float()
            }
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's; with master_weights the float32 state stays float32 (torch casts state to the
        weight's dtype)."""
        super().load_state_dict(state_dict)
        if not self._master:
            return
        param = self._param()
        for name, value in state_dict["state"].get(0, {}).items():
            if isinstance(value, torch.Tensor) and name != "step" and value.is_floating_point():
                self.state[param][name] = value.to(device=param.device, dtype=torch.float32, copy=True)


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr as a tensor must be a 1-element floating-point tensor; got shape {tuple(lr.shape)}")
    elif not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"lr must be a float >= 0 or a tensor; got {lr!r}")


def _check_nonneg(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a float >= 0; got {value!r}")
    return float(value)


class SGD(_FusedOptimizer):
    """torch.optim.SGD (single-tensor form) on a head's weight, applied in the head's backward.

    Args:
        head: a facekernels head (backend "auto", "cpu" or "triton"); its weight is the one parameter.
        lr: learning rate, a float >= 0 or a 0-dim tensor (read at each backward).
        momentum: momentum factor (the buffer starts as the first gradient, as torch's).
        dampening: dampening of the momentum (not applied to the first gradient, as torch).
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        master_weights: bfloat16 / float16 weights: update a float32 copy with float32 state.
        grad_scaler: the torch.amp.GradScaler whose scaled losses this head's backward sees (module docstring).
    """

    def __init__(self, head, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 master_weights=False, grad_scaler=None):  # fmt: skip
        _check_lr(lr)
        momentum = _check_nonneg("momentum", momentum)
        if not isinstance(dampening, (int, float)) or isinstance(dampening, bool):
            raise ValueError(f"dampening must be a float; got {dampening!r}")
        dampening = float(dampening)
        weight_decay = _check_nonneg("weight_decay", weight_decay)
        V.check_bool("nesterov", nesterov)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening == 0")
        # torch.optim.SGD's keys, so that state_dicts load both ways
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=False, foreach=None, differentiable=False, fused=None)  # fmt: skip
        super().__init__(head, defaults, master_weights, grad_scaler)

    def _init_state(self, state, work):
        self._first = False
        if self.param_groups[0]["momentum"] != 0 and state.get("momentum_buffer") is None:
            # zeros, not empty: the rows of a skipped (non-finite) first chunk must not hold garbage
            state["momentum_buffer"] = torch.zeros_like(work, memory_format=torch.preserve_format)
            self._first = True

    def _chunk_update(self, group, grad, p, rows):
        # torch's single-tensor SGD, operation for operation (its out-of-place adds done in place on grad)
        weight_decay, momentum = group["weight_decay"], group["momentum"]
        if weight_decay != 0:
            grad.add_(p, alpha=weight_decay)
        if momentum != 0:
            buf = rows["momentum_buffer"]
            if self._first:
                buf.copy_(grad)  # torch: the first buffer is the gradient itself (no dampening)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            grad = grad.add_(buf, alpha=momentum) if group["nesterov"] else buf
        _minus_lr_times_(p, grad, self._lr)


class AdamW(_FusedOptimizer):
    """torch.optim.AdamW (single-tensor form, amsgrad=False) on a head's weight, applied in the head's backward.

    Args:
        head: a facekernels head (backend "auto", "cpu" or "triton"); its weight is the one parameter.
        lr: learning rate, a float >= 0 or a 0-dim tensor (read at each backward).
        betas: (beta1, beta2), the moments' decay, each in [0, 1).
        eps: added to the denominator, >= 0.
        weight_decay: decoupled weight decay: p *= 1 - lr * weight_decay before the Adam step.
        master_weights: bfloat16 / float16 weights: update a float32 copy with float32 state.
        grad_scaler: the torch.amp.GradScaler whose scaled losses this head's backward sees (module docstring).
    """

    def __init__(self, head, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, master_weights=False,
                 grad_scaler=None):  # fmt: skip
        _check_lr(lr)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of floats; got {betas!r}")
        for i, beta in enumerate(betas):
            if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0 <= beta < 1:
                raise ValueError(f"betas[{i}] must be a float in [0, 1); got {beta!r}")
        eps = _check_nonneg("eps", eps)
        weight_decay = _check_nonneg("weight_decay", weight_decay)
        # torch.optim.AdamW's keys, so that state_dicts load both ways
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)  # fmt: skip
        super().__init__(head, defaults, master_weights, grad_scaler)

    def _check_group(self, group):
        super()._check_group(group)
        if group.get("amsgrad", False):
            raise ValueError("amsgrad=True is not supported by the fused AdamW")
        if not group.get("decoupled_weight_decay", True):
            raise ValueError("decoupled_weight_decay=False (Adam's L2 penalty) is not supported by the fused AdamW")

    def _init_state(self, state, work):
        if "exp_avg" not in state:
            # torch's layout: a CPU scalar step (capturable=False), zero moments like the weight
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
            state["exp_avg"] = torch.zeros_like(work, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(work, memory_format=torch.preserve_format)

    def _begin_step(self, group, state):
        # torch increments the step before its update; here step() does, so the backward uses step + 1. A CPU
        # scalar (torch's layout): reading it is no device sync
        step = float(state["step"]) + 1
        beta1, beta2 = group["betas"]
        self._bias_correction1 = 1 - beta1**step
        self._bias_correction2_sqrt = (1 - beta2**step) ** 0.5

    def _chunk_update(self, group, grad, p, rows):
        # torch's single-tensor AdamW (capturable=False), operation for operation
        lr, weight_decay, eps = self._lr, group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = rows["exp_avg"], rows["exp_avg_sq"]
        if weight_decay != 0:
            p.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / self._bias_correction2_sqrt).add_(eps)
        if isinstance(lr, torch.Tensor):
            # torch would read a tensor's step size on the host (value=); its no-sync form, within a rounding
            p.sub_(exp_avg.div(denom).mul_(lr.to(p.device) / self._bias_correction1))
        else:
            p.addcdiv_(exp_avg, denom, value=-(lr / self._bias_correction1))

    def _close_step(self, state):
        state["step"] += 1
