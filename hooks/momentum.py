"""Momentum attention as a hook on any hooked model (method.md section 4).

Each attention head's output at position ``t`` gets an exponential moving average of the
head's *earlier* value vectors added before the output projection ``W_O``::

    z_t  <-  z_t + sum_{i<t} eta^(t-i) v_i

``v_i`` is the head's value vector at position ``i`` as it leaves ``hook_v`` (value bias
included). With grouped-query attention, query head ``h`` uses the values of its shared
key/value head ``h // (n_heads // n_key_value_heads)``, the same grouping TransformerLens
and Hugging Face use. ``eta`` is fixed (a float or a per-head tensor) or learned per head
(one ``nn.Parameter`` of shape ``[n_heads]`` per layer, ``eta = sigmoid(logit)``).

It works on a TransformerLens 3 ``HookedTransformer`` and on a ``TransformerBridge`` of
TransformerLens 3 or 4: it reads ``blocks.{l}.attn.hook_v`` and rewrites
``blocks.{l}.attn.hook_z`` with permanent hooks, so it survives ``run_with_cache``,
``run_with_hooks`` and ``reset_hooks()``; :func:`remove_momentum` removes exactly these
hooks and leaves everyone else's, permanent ones included.

>>> import torch
>>> from transformer_lens.model_bridge import TransformerBridge
>>> from icl_lens.hooks.momentum import add_momentum, remove_momentum
>>> model = TransformerBridge.boot_native(dict(n_layers=2, d_model=32, n_ctx=32,
...     d_head=8, n_heads=4, d_vocab=50, act_fn="gelu", seed=0))
>>> tokens = torch.tensor([[1, 5, 7, 9, 2]])
>>> plain = model(tokens)
>>> handle = add_momentum(model, eta=0.5)
>>> moved = model(tokens)
>>> torch.equal(moved[:, 0], plain[:, 0]), torch.allclose(moved[:, 1:], plain[:, 1:])
(True, False)
>>> remove_momentum(model)
>>> torch.equal(model(tokens), plain)
True

Caveats:

* Padding: the moving average runs over every position of the input. Un-padded and
  right-padded batches are exact (padding comes after the real tokens, and the sum is
  causal). For left-padded batches pass the attention mask with
  :meth:`MomentumHandle.attention_mask` so padded positions contribute nothing.
* A key/value cache (``generate``, ``past_kv_cache=...``) is refused with an error: the
  hook sees only the new positions' values, so the sum would silently miss the prefix.
  Generate without the cache (``use_past_kv_cache=False`` on a ``HookedTransformer``).
* The momentum term uses ``v`` as it leaves ``hook_v`` after the hooks that were there
  when :func:`add_momentum` ran; a hook added later on ``hook_v`` (for example a patch
  passed to ``run_with_hooks``) changes attention but not the momentum term.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = ["MomentumHandle", "add_momentum", "momentum_handle", "momentum_term", "remove_momentum"]

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, MomentumHandle] = weakref.WeakKeyDictionary()


def _hook_name(layer: int, point: str) -> str:
    return f"blocks.{layer}.attn.{point}"


def _decay_matrix(eta: Float[Tensor, " head"], n_pos: int) -> Float[Tensor, "head pos pos"]:
    """``D[h, t, i] = eta_h ** (t - i)`` for ``i < t``, else 0 (strictly lower triangular)."""
    pos = torch.arange(n_pos, device=eta.device)
    dist = pos[:, None] - pos[None, :]
    strict = dist > 0
    # Exponents clamped to >= 1 so masked entries stay finite (eta = 0 would give inf and a
    # NaN gradient through torch.where otherwise).
    powers = eta[:, None, None] ** dist.clamp(min=1).to(eta.dtype)
    return torch.where(strict, powers, torch.zeros((), dtype=eta.dtype, device=eta.device))


def momentum_term(
    v: Float[Tensor, "batch pos kv_head d_head"],
    eta: Float[Tensor, " head"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos head d_head"]:
    """``m_t = sum_{i<t} eta^(t-i) v_i`` for every head, vectorised.

    ``v`` may have fewer heads than ``eta`` (grouped-query attention): query head ``h``
    reads key/value head ``h // (n_heads // n_kv_heads)``. Positions where
    ``attention_mask`` is 0 contribute nothing.

    >>> v = torch.ones(1, 3, 1, 2)
    >>> momentum_term(v, torch.tensor([0.5, 0.5]))[0, :, 0, 0]
    tensor([0.0000, 0.5000, 0.7500])
    """
    n_heads, n_kv = eta.shape[0], v.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly")
    if n_kv != n_heads:
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
    if attention_mask is not None:
        v = v * attention_mask.to(device=v.device, dtype=v.dtype)[:, :, None, None]
    compute_dtype = torch.promote_types(v.dtype, torch.float32)
    decay = _decay_matrix(eta.to(device=v.device, dtype=compute_dtype), v.shape[1])
    return torch.einsum("hti,bihd->bthd", decay, v.to(compute_dtype)).to(v.dtype)


class MomentumHandle(nn.Module):
    """Momentum attention installed on one model; returned by :func:`add_momentum`.

    It is an ``nn.Module`` that owns the learnable ``eta`` logits (if any) and is *not* a
    submodule of the model: train it with its own ``parameters()``, save it with
    ``state_dict()``. ``remove()`` (or :func:`remove_momentum`) takes the hooks off; it is
    also a context manager that removes them on exit.

    Attributes:
        layers: the layers that have momentum, ascending.
        learnable: whether ``eta`` is learned (``eta = sigmoid(logits[f"layer_{l}"])``).
        logits: ``nn.ParameterDict`` of ``[n_heads]`` logits per layer (empty if fixed);
            a fixed ``eta`` is a buffer ``fixed_eta_{layer}`` instead.

    >>> import torch
    >>> from transformer_lens.model_bridge import TransformerBridge
    >>> model = TransformerBridge.boot_native(dict(n_layers=2, d_model=32, n_ctx=32,
    ...     d_head=8, n_heads=4, d_vocab=50, act_fn="gelu", seed=0))
    >>> with add_momentum(model, eta=0.9, learnable=True) as handle:
    ...     opt = torch.optim.SGD(handle.parameters(), lr=1.0)
    ...     loss = model(torch.tensor([[1, 2, 3, 4]]), return_type="loss")
    ...     loss.backward()
    ...     opt.step()
    ...     handle.etas().shape
    torch.Size([2, 4])
    >>> momentum_handle(model) is None
    True
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        eta: Float[Tensor, "layer head"],
        learnable: bool,
    ) -> None:
        super().__init__()
        self._model_ref = weakref.ref(model)
        self.layers: list[int] = layers
        self.learnable = learnable
        self.logits = nn.ParameterDict()
        for row, layer in zip(eta, layers, strict=True):
            if learnable:
                self.logits[f"layer_{layer}"] = nn.Parameter(torch.logit(row.double()).float())
            else:
                self.register_buffer(f"fixed_eta_{layer}", row.detach().clone())
        self._values: dict[int, Tensor] = {}
        self._mask: Tensor | None = None
        self._handles: list[tuple[Any, Any]] = []  # (HookPoint, LensHandle)
        self._removed = False

    # -- eta ---------------------------------------------------------------------------

    def eta(self, layer: int) -> Float[Tensor, " head"]:
        """``eta`` per head at ``layer`` (differentiable when learnable)."""
        if layer not in self.layers:
            raise KeyError(f"layer {layer} has no momentum; layers with momentum: {self.layers}")
        if self.learnable:
            return torch.sigmoid(self.logits[f"layer_{layer}"])
        return getattr(self, f"fixed_eta_{layer}")

    def etas(self) -> Float[Tensor, "layer head"]:
        """``eta`` for every layer in :attr:`layers` (rows in that order), detached."""
        return torch.stack([self.eta(layer).detach() for layer in self.layers])

    # -- padding -----------------------------------------------------------------------

    @contextlib.contextmanager
    def attention_mask(self, mask: Int[Tensor, "batch pos"]) -> Iterator[MomentumHandle]:
        """Within this context, positions where ``mask`` is 0 add no momentum.

        Use it for left-padded batches (pass the same mask to the model)::

            with handle.attention_mask(mask):
                logits = model(tokens, attention_mask=mask)
        """
        if mask.ndim != 2:
            raise ValueError(f"attention mask must be [batch, pos], got shape {tuple(mask.shape)}")
        previous, self._mask = self._mask, mask
        try:
            yield self
        finally:
            self._mask = previous

    # -- hooks -------------------------------------------------------------------------

    def _store_v(self, layer: int) -> Any:
        def hook(v: Tensor, hook: Any) -> None:
            self._values[layer] = v

        return hook

    def _check_no_cache(self, layer: int) -> Any:
        def hook(pattern: Tensor, hook: Any) -> None:
            if pattern.shape[-1] != pattern.shape[-2]:
                self._values.pop(layer, None)
                raise RuntimeError(
                    f"momentum attention (layer {layer}) cannot run with a key/value cache: "
                    f"{pattern.shape[-2]} query positions attend to {pattern.shape[-1]} keys, "
                    "and the earlier positions' values are not visible to the hook. Run the "
                    "full sequence without a cache (e.g. use_past_kv_cache=False), or call "
                    "remove_momentum(model) first."
                )

        return hook

    def _add_momentum(self, layer: int) -> Any:
        def hook(z: Tensor, hook: Any) -> Tensor:
            v = self._values.pop(layer, None)
            if v is None:
                raise RuntimeError(
                    f"momentum attention: blocks.{layer}.attn.hook_z fired before hook_v in "
                    "this forward pass, so there are no value vectors to average."
                )
            batch, pos, n_heads, d_head = z.shape
            if v.shape[0] != batch or v.shape[1] != pos or v.shape[3] != d_head:
                raise RuntimeError(
                    f"momentum attention: hook_v shape {tuple(v.shape)} does not match hook_z "
                    f"shape {tuple(z.shape)} at layer {layer} (a key/value cache?)."
                )
            mask = self._mask
            if mask is not None and tuple(mask.shape) != (batch, pos):
                raise ValueError(
                    f"attention mask shape {tuple(mask.shape)} does not match the input "
                    f"({batch}, {pos})"
                )
            eta = self.eta(layer)
            if eta.shape[0] != n_heads:
                raise RuntimeError(f"eta has {eta.shape[0]} heads, hook_z has {n_heads}")
            return z + momentum_term(v, eta, mask).to(z.dtype)

        return hook

    def _install(self, model: nn.Module) -> None:
        hook_dict = model.hook_dict
        for layer in self.layers:
            hooks = [("hook_v", self._store_v(layer)), ("hook_z", self._add_momentum(layer))]
            if _hook_name(layer, "hook_pattern") in hook_dict:
                hooks.append(("hook_pattern", self._check_no_cache(layer)))
            for point, fn in hooks:
                name = _hook_name(layer, point)
                hook_point = hook_dict[name]
                before = {id(h) for h in hook_point.fwd_hooks}
                model.add_hook(name, fn, is_permanent=True)
                new = [h for h in hook_point.fwd_hooks if id(h) not in before]
                if len(new) != 1:
                    self._uninstall()
                    raise RuntimeError(
                        f"could not identify the hook added at {name} (found {len(new)} new "
                        "handles); this TransformerLens version is not supported"
                    )
                self._handles.append((hook_point, new[0]))

    def _uninstall(self) -> None:
        for hook_point, handle in reversed(self._handles):
            handle.hook.remove()
            hook_point.fwd_hooks[:] = [h for h in hook_point.fwd_hooks if h is not handle]
        self._handles.clear()
        self._values.clear()

    def remove(self) -> None:
        """Take this handle's hooks off the model (idempotent); other hooks are untouched."""
        if self._removed:
            return
        self._uninstall()
        self._removed = True
        model = self._model_ref()
        if model is not None and _ACTIVE.get(model) is self:
            del _ACTIVE[model]

    @property
    def active(self) -> bool:
        """Whether all the hooks are still on the model.

        False after :meth:`remove`, and also after ``model.reset_hooks(including_permanent=True)``
        took them off behind this handle's back.
        """
        if self._removed or self._model_ref() is None:
            return False
        return all(
            any(h is handle for h in hook_point.fwd_hooks) for hook_point, handle in self._handles
        )

    def __enter__(self) -> MomentumHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def extra_repr(self) -> str:
        kind = "learnable" if self.learnable else "fixed"
        return f"layers={self.layers}, eta={kind}, active={self.active}"


def _layer_list(layers: int | Iterable[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    items = [layers] if isinstance(layers, int) else list(layers)
    out = set()
    for layer in items:
        if not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layer {layer!r} is not an int in [-{n_layers}, {n_layers})")
        out.add(layer % n_layers)
    if not out:
        raise ValueError("layers is empty; pass None for every layer")
    return sorted(out)


def _eta_table(
    eta: float | Tensor, layers: list[int], n_layers: int, n_heads: int, learnable: bool
) -> Float[Tensor, "layer head"]:
    table = torch.as_tensor(eta, dtype=torch.float32).detach().cpu()
    if table.ndim == 0:
        table = table.expand(len(layers), n_heads)
    elif table.shape == (n_heads,):
        table = table.expand(len(layers), n_heads)
    elif table.shape == (n_layers, n_heads):
        table = table[layers]
    else:
        raise ValueError(
            f"eta must be a float, a [n_heads]={n_heads} tensor or a [n_layers, n_heads]="
            f"[{n_layers}, {n_heads}] tensor; got shape {tuple(table.shape)}"
        )
    if not torch.isfinite(table).all():
        raise ValueError("eta must be finite")
    if learnable and not ((table > 0) & (table < 1)).all():
        raise ValueError("learnable eta = sigmoid(logit) needs an initial eta in (0, 1)")
    if not learnable and not ((table >= 0) & (table <= 1)).all():
        raise ValueError("eta must be in [0, 1] (a decay factor)")
    return table.clone()


def add_momentum(
    model: nn.Module,
    eta: float | Float[Tensor, " head"] | Float[Tensor, "n_layers head"] = 0.9,
    *,
    layers: int | Iterable[int] | None = None,
    learnable: bool = False,
) -> MomentumHandle:
    """Turn on momentum attention: ``z_t += sum_{i<t} eta^(t-i) v_i`` before ``W_O``.

    Args:
        model: a ``HookedTransformer`` (TransformerLens 3) or a ``TransformerBridge``
            (TransformerLens 3 or 4), anything with ``cfg.n_layers``, ``cfg.n_heads``,
            ``hook_dict`` and ``add_hook`` exposing ``blocks.{l}.attn.hook_v`` / ``hook_z``.
        eta: decay in [0, 1]: a float for every head, a ``[n_heads]`` tensor shared by the
            chosen layers, or a ``[n_layers, n_heads]`` tensor indexed by layer. With
            ``learnable=True`` it is the initial value, in (0, 1).
        layers: a layer or layers to modify (negative indices allowed); default every layer.
        learnable: learn ``eta`` per head as ``sigmoid(logit)``; the logits are
            ``handle.parameters()``, on the model's device, float32.

    Returns:
        A :class:`MomentumHandle`; the model has momentum until ``handle.remove()`` or
        :func:`remove_momentum`. One handle per model: adding twice is an error.

    >>> import torch
    >>> from transformer_lens.model_bridge import TransformerBridge
    >>> model = TransformerBridge.boot_native(dict(n_layers=2, d_model=32, n_ctx=32,
    ...     d_head=8, n_heads=4, d_vocab=50, act_fn="gelu", seed=0))
    >>> handle = add_momentum(model, eta=torch.tensor([0.0, 0.3, 0.6, 0.9]), layers=[1])
    >>> handle.etas()
    tensor([[0.0000, 0.3000, 0.6000, 0.9000]])
    >>> _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))  # cache holds z + momentum
    >>> remove_momentum(model)
    """
    if not (hasattr(model, "hook_dict") and hasattr(model, "add_hook") and hasattr(model, "cfg")):
        raise TypeError(
            f"add_momentum needs a TransformerLens HookedTransformer or TransformerBridge, "
            f"got {type(model).__name__}"
        )
    existing = _ACTIVE.get(model)
    if existing is not None:
        if existing.active:
            raise RuntimeError(
                "momentum attention is already on this model; call remove_momentum(model) "
                "(or handle.remove()) before adding it again"
            )
        existing.remove()  # hooks were reset behind its back: drop any leftovers
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    chosen = _layer_list(layers, n_layers)
    hook_dict = model.hook_dict
    missing = [
        _hook_name(layer, point)
        for layer in chosen
        for point in ("hook_v", "hook_z")
        if _hook_name(layer, point) not in hook_dict
    ]
    if missing:
        raise ValueError(f"model has no hook points {missing[:4]}; momentum needs hook_v/hook_z")
    table = _eta_table(eta, chosen, n_layers, n_heads, learnable)
    handle = MomentumHandle(model, chosen, table, learnable)
    param = next(iter(model.parameters()), None)
    if param is not None:
        handle.to(param.device)
    handle._install(model)
    _ACTIVE[model] = handle
    return handle


def momentum_handle(model: nn.Module) -> MomentumHandle | None:
    """The active :class:`MomentumHandle` on ``model``, or None."""
    handle = _ACTIVE.get(model)
    return handle if handle is not None and handle.active else None


def remove_momentum(model: nn.Module) -> None:
    """Remove momentum attention from ``model`` (no-op if it has none).

    Only the momentum hooks are removed; other hooks, permanent or not, stay.
    """
    handle = _ACTIVE.get(model)
    if handle is not None:
        handle.remove()
