"""``patch_causal_lm``: any Hugging Face causal LM computes its loss with the fused primitive,
inside its own forward, with no ``[B, T, V]`` logits and no per-architecture code.

How (the model's own forward still runs, untouched):

* The output embedding (``get_output_embeddings()``, an ``nn.Linear``) gets a forward of its
  own. Called without labels (generation, ``model(input_ids)``) it is the plain linear
  layer. In a call that carries labels it computes the loss (or TRL's per-token fields) from
  the hidden states the model hands it, and returns a tiny probe in place of the logits. So
  the fused loss runs exactly where the model's head matmul would: inside the model's
  forward, under whatever wraps it (accelerate's autocast, DDP), with the weight that
  FSDP2 and ZeRO-3 gather for that module.
* A forward pre-hook on the model takes ``labels``, ``shift_labels``, ``num_items_in_batch``
  and ``fused_lm_head`` out of the call, so the model's forward never forms a loss on
  logits; a forward hook puts the loss (plus the MoE load-balancing loss, as the stock
  model adds it) into the model's output with ``logits=None``, or returns TRL's
  :class:`~fused_losses.integrations.trl.FusedCausalLMOutput`. Hooks fire on every call of
  the module, so the order against wrappers of ``model.forward`` (TRL's fused head,
  accelerate) does not matter.
* What the model does to its head's output (Gemma-2's ``final_logit_softcapping``,
  Cohere's ``logit_scale``, Granite's ``logits_scaling``) is read from the config; on the
  first call with labels the probe, passed through the model's own forward, checks that
  the model does exactly that, and a mismatch is an error, not a silently different loss.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.utils import ModelOutput

from ..backends import BACKENDS
from ..cross_entropy import linear_cross_entropy
from ..objectives.logprobs import PROBE, causal_lm_head, transform_mismatch
from ..primitive import check_options, check_positive_finite
from .trl import (DEFAULT_OUTPUTS, FusedCausalLMOutput, check_outputs, fused_head_fields,
                  trl_head_options)

IGNORE_INDEX = -100


class _Request(NamedTuple):
    """What one call with labels asks of the head."""

    labels: torch.Tensor  # [B, T] Hugging Face labels, or next-token targets if shifted
    shifted: bool  # the caller passed shift_labels
    num_items_in_batch: torch.Tensor | int | None
    fused_lm_head: bool  # TRL's protocol: per-token fields instead of the stock output
    trl_options: dict | None  # the options of a TRL head on model.forward, if any


class _Patch:
    """The state of one patched model; its bound methods are the hooks and the head forward.

    Hooks are bound methods (not closures) so ``copy.deepcopy(model)`` (TRL's reference
    models) copies the patch along with the model and the copy's hooks serve the copy.
    """

    def __init__(self, causal_lm, head, *, temperature, outputs, cast_lm_head_to_fp32,
                 primitive_options):
        self.causal_lm, self.head = causal_lm, head
        self.transform = {k: v for k, v in causal_lm_head(causal_lm).options.items()
                          if k in ("temperature", "softcap")}
        self.model_temperature = self.transform.get("temperature", 1.0)  # 1/logit scale
        self.softcap = self.transform.get("softcap")
        config = causal_lm.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.aux_loss_coef = getattr(causal_lm, "router_aux_loss_coef",
                                     getattr(text_config, "router_aux_loss_coef", 0.0))
        self.temperature, self.outputs = temperature, outputs
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        self.primitive_options = primitive_options
        self.transform_checked = False
        self.request: _Request | None = None
        self.result: FusedCausalLMOutput | torch.Tensor | None = None

    # -- model hooks ---------------------------------------------------------------------------

    def before_forward(self, module, args, kwargs):
        self.request = self.result = None
        labels, shift_labels = kwargs.pop("labels", None), kwargs.pop("shift_labels", None)
        fused_lm_head = kwargs.pop("fused_lm_head", False)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if labels is None and shift_labels is None:
            if fused_lm_head:
                raise ValueError("fused_lm_head=True needs labels= (Hugging Face labels "
                                 "[B, T]) or shift_labels= (next-token targets [B, T])")
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return args, kwargs
        self._check_head_is_patched()
        keep = kwargs.get("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise ValueError(f"logits_to_keep={keep!r} with labels: a patched model scores "
                             "every labelled position; mask the labels instead")
        if fused_lm_head:
            kwargs["use_cache"] = False  # training and scoring never read a cache
        self.request = _Request(
            labels=labels if shift_labels is None else shift_labels,
            shifted=shift_labels is not None, num_items_in_batch=num_items_in_batch,
            fused_lm_head=bool(fused_lm_head),
            trl_options=self._trl_options(module) if fused_lm_head else None)
        return args, kwargs

    def _check_head_is_patched(self) -> None:
        """A head replaced or wrapped after patching would either never compute the loss or
        compute it without what wraps it (an adapter's delta): refuse both."""
        current = self.causal_lm.get_output_embeddings()
        if current is not self.head:
            raise RuntimeError(
                f"the output embedding of {type(self.causal_lm).__name__} was replaced after "
                f"patch_causal_lm patched it ({type(self.head).__name__} then, "
                f"{type(current).__name__} now: resize_token_embeddings, "
                "set_output_embeddings or an adapter on the head), so the loss would not be "
                "the model's. Call patch_causal_lm(model) again after replacing the head (an "
                "adapter-wrapped head cannot be patched), or unpatch_causal_lm(model) for the "
                "stock loss")

    def _trl_options(self, module) -> dict | None:
        found = trl_head_options(module)
        return trl_head_options(self.causal_lm) if found is None else found

    def after_forward(self, module, args, kwargs, output):
        request, result = self.request, self.result
        self.request = self.result = None
        if request is None:
            return output
        if not isinstance(output, ModelOutput):
            raise TypeError(f"{type(module).__name__} returned a {type(output).__name__}, not "
                            "a ModelOutput; a patched model needs return_dict=True")
        if result is None:
            raise RuntimeError(
                f"{type(module).__name__}'s forward never called its output embedding "
                f"({type(self.head).__name__} from get_output_embeddings()): it forms its "
                "logits some other way (from the head's weight directly?), so "
                "patch_causal_lm cannot compute its loss; unpatch_causal_lm(model) restores "
                "the stock loss")
        logits = output.get("logits")
        self._check_transform(module, logits)
        # The probe carries the head's results through the model's own graph, so hooks
        # that act on the head module's outputs in backward (ZeRO-3 gathers the weight
        # there) run before the fused backward that needs the weight. It adds exactly 0.
        tie = logits.float().sum() * 0
        aux_loss = output.get("aux_loss")
        aux_term = 0.0 if aux_loss is None else self.aux_loss_coef * aux_loss.to(tie.device)
        if request.fused_lm_head:
            return FusedCausalLMOutput(
                loss=result.loss + tie + aux_term,
                **{name: value + tie if value is not None and value.requires_grad else value
                   for name, value in result.items() if name not in ("loss", "aux_loss")},
                aux_loss=aux_loss)
        fields = {name: value for name, value in output.items() if name != "logits"}
        return type(output)(**{**fields, "loss": result + tie + aux_term})

    def _check_transform(self, module, logits) -> None:
        if self.transform_checked:
            return
        problem = transform_mismatch(module, self.transform, logits)
        if problem:
            raise ValueError(f"{problem}. Its loss would differ from the stock model's, so it "
                             "is not patched silently")
        self.transform_checked = True

    # -- the head -------------------------------------------------------------------------------

    def head_forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request, head = self.request, self.head
        if request is None:
            return type(head).forward(head, hidden)
        if self.result is not None:
            raise RuntimeError("the output embedding ran twice in one forward with labels "
                               "(a second head call in the model or a hook); patch_causal_lm "
                               "computes one loss per forward from one head call. "
                               "unpatch_causal_lm(model) restores the stock loss")
        weight, bias = head.weight, head.bias
        _check_weight(weight)
        labels = request.labels.to(hidden.device)
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(labels.shape):
            raise ValueError(
                f"labels (shape {tuple(labels.shape)}) do not match the hidden states the "
                f"model passes its head (shape {tuple(hidden.shape)}); expected [B, T] "
                "labels for [B, T, H] hidden states")
        num_items = request.num_items_in_batch
        if isinstance(num_items, torch.Tensor):
            num_items = num_items.to(hidden.device)
        if request.fused_lm_head:
            self.result = self._fused_fields(hidden, weight, bias, labels, request, num_items)
            anchor = self.result.log_probs.sum()
        else:
            options = dict(self.primitive_options)
            if not torch.is_grad_enabled():  # nothing to form gradients for (evaluation)
                options["grad_in_forward"] = False
            self.result = anchor = linear_cross_entropy(
                hidden, weight, labels, bias, shift=not request.shifted,
                num_items_in_batch=num_items, temperature=self.model_temperature,
                softcap=self.softcap, **options)
        values = torch.tensor([[PROBE]], dtype=hidden.dtype, device=hidden.device)
        # Not a view (FSDP2 warns about returned views); forward value exactly the probe.
        return torch.where(torch.zeros_like(values, dtype=torch.bool), anchor.to(values.dtype),
                           values)

    def _fused_fields(self, hidden, weight, bias, labels, request, num_items):
        temperature, outputs, cast = self.temperature, self.outputs, self.cast_lm_head_to_fp32
        if request.trl_options is not None:
            trl = request.trl_options
            if temperature is not None and float(temperature) != float(trl["temperature"]):
                raise ValueError(
                    f"patch_causal_lm(temperature={temperature}) disagrees with the TRL "
                    f"fused head on this model (temperature={trl['temperature']}); pass "
                    "the trainer's temperature, or none")
            temperature, outputs = trl["temperature"], check_outputs(trl["outputs"])
            cast = cast or bool(trl["cast_lm_head_to_fp32"])
        temperature = 1.0 if temperature is None else float(temperature)
        # TRL divides the soft-capped logits by its temperature: (s/T)·tanh(x/s) is the
        # primitive's soft-cap s/T at temperature T.
        softcap = None if self.softcap is None else self.softcap / temperature
        options = dict(temperature=self.model_temperature * temperature, softcap=softcap,
                       outputs=outputs, shifted=request.shifted, num_items_in_batch=num_items)
        primitive_options = {k: v for k, v in self.primitive_options.items()
                             if k != "grad_in_forward"}
        if not cast:
            return fused_head_fields(hidden, weight, bias, labels, **options,
                                     **primitive_options)
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_head_fields(hidden.float(), weight.float(),
                                     None if bias is None else bias.float(), labels,
                                     **options, **primitive_options)


def _check_weight(weight: torch.Tensor) -> None:
    """The head's weight as its forward sees it must be the full [V, H] matrix."""
    if type(weight).__name__ == "DTensor":
        raise TypeError(
            f"the LM head's weight is a DTensor (placements {weight.placements}) inside its "
            "forward: a tensor-parallel head. patch_causal_lm needs the full [V, H] weight; "
            "for a vocabulary-parallel head call fused_losses.linear_logprobs with "
            "process_group= on the hidden states instead")
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(
            f"the LM head's weight has shape {tuple(weight.shape)}, not [V, H]: it is "
            "partitioned (DeepSpeed ZeRO-3) or sharded and was not gathered for this call. "
            "patch_causal_lm computes the loss inside the head module's own forward, where "
            "ZeRO-3 and FSDP gather it, so call the model (model(...)), not its head's "
            "weight or forward directly")


def _find_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside wrappers (DDP's ``module``, torch.compile's ``_orig_mod``)."""
    found, seen = model, set()
    while id(found) not in seen:
        seen.add(id(found))
        if hasattr(found, "get_output_embeddings") and hasattr(found, "config"):
            return found
        inner = getattr(found, "module", None)
        inner = getattr(found, "_orig_mod", None) if inner is None else inner
        found = found if inner is None else inner
    raise TypeError(f"model ({type(model).__name__}) is not a Hugging Face causal LM: expected "
                    "get_output_embeddings() and a config (or a wrapper with .module)")


def patch_causal_lm(
    model: torch.nn.Module,
    *,
    temperature: float | None = None,
    outputs: tuple[str, ...] = DEFAULT_OUTPUTS,
    cast_lm_head_to_fp32: bool = False,
    backend: str = "auto",
    filter_eps: float | None = None,
    chunk_size: int | None = None,
    grad_in_forward: bool | None = None,
) -> torch.nn.Module:
    """Make ``model`` compute its loss with the fused primitive, inside its own forward.

    ``model(input_ids, attention_mask=..., labels=labels, num_items_in_batch=n)`` returns
    the loss the stock model returns (Hugging Face's causal-LM cross-entropy: labels
    shifted inside, ``-100`` ignored, summed and divided by ``n`` or averaged over scored
    labels; ``shift_labels=`` for next-token targets; plus the MoE load-balancing loss
    where the stock model adds it), with ``logits=None``; no ``[B, T, V]`` tensor is formed.
    A batch with every label ignored gives 0, not the stock model's NaN.

    ``model(..., labels=labels, fused_lm_head=True)`` (or ``shift_labels=``) returns TRL's
    :class:`~fused_losses.integrations.trl.FusedCausalLMOutput`: ``loss``, per-token
    ``log_probs``, ``entropy``, ``log_sum_sq_probs``, ``mean_logits``, ``is_top1``,
    ``label_mask`` and ``aux_loss``, [B, T-1] (or [B, T] with ``shift_labels``). When TRL's
    own ``add_fused_lm_head`` wraps the model (a TRL trainer adds it in ``__init__``),
    its temperature, outputs and fp32 cast are used, before or after this patch alike.

    Calls without labels (``generate``, evaluation of logits) run the stock model unchanged.
    Works for any ``transformers`` model whose forward calls ``get_output_embeddings()``
    (an ``nn.Linear``, tied or not, on the model or on a vision-language wrapper): the
    config's ``final_logit_softcapping``, ``logit_scale`` and ``logits_scaling`` are
    applied, and the first call with labels checks them against the model's own forward.

    Args:
        model (nn.Module): a Hugging Face causal LM, or a wrapper whose call reaches it (DDP,
            accelerate); patched in place. Hooks go on ``model``, the head forward on its
            output embedding.
        temperature (float, optional): TRL's: the logits of ``fused_lm_head=True`` calls are
            divided by it (after the model's soft-cap, as TRL does); the plain loss is
            always the stock one. Default: None (TRL's head's value, else 1.0).
        outputs (tuple of str): fields computed for ``fused_lm_head=True`` calls, among
            ``log_probs``, ``entropy``, ``log_sum_sq_probs`` (a second forward pass over the
            vocabulary), ``mean_logits`` and ``is_top1``. Default: every field but
            ``log_sum_sq_probs`` (the others come from the same pass).
        cast_lm_head_to_fp32 (bool): TRL's: run ``fused_lm_head=True`` calls in float32
            outside autocast. Default: False.
        backend, filter_eps, chunk_size: as in :func:`fused_losses.linear_logprobs`.
        grad_in_forward (bool, optional): as in :func:`fused_losses.linear_cross_entropy`,
            for the plain loss. Default: None (that function's default; off without grad).

    Returns:
        nn.Module: ``model``, patched. :func:`unpatch_causal_lm` undoes it.
    """
    causal_lm = _find_causal_lm(model)
    head = causal_lm.get_output_embeddings()
    if head is None or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(
            f"{type(causal_lm).__name__}.get_output_embeddings() is "
            f"{type(head).__name__}, not an nn.Linear; patch_causal_lm computes exactly a "
            "linear head (with optional bias), so it does not patch a custom, quantised or "
            "adapter-wrapped head")
    if is_patched(model):
        unpatch_causal_lm(model)
    elif isinstance(getattr(vars(head).get("forward"), "__self__", None), _Patch):
        raise ValueError(f"the output embedding of {type(causal_lm).__name__} is already "
                         "patched, through another module (a wrapper of this model, such as "
                         "DDP's, or the model inside the wrapper given now); patch one of "
                         "them only: unpatch_causal_lm the one patched first")
    elif "forward" in vars(head):
        raise ValueError(f"the output embedding of {type(causal_lm).__name__} has a forward "
                         "of its own set on the instance (by another library?), which "
                         "patch_causal_lm would replace; remove it first")
    # Every option is checked here, at patch time, not at the first training step.
    if temperature is not None:
        check_positive_finite("temperature (None for the TRL head's, else 1.0)", temperature)
    if not isinstance(cast_lm_head_to_fp32, bool):
        raise TypeError(f"cast_lm_head_to_fp32 must be a bool, got {cast_lm_head_to_fp32!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_options(filter_eps=filter_eps, chunk_size=chunk_size)
    if grad_in_forward is not None and not isinstance(grad_in_forward, bool):
        raise TypeError(f"grad_in_forward must be None or a bool, got {grad_in_forward!r}")
    primitive_options = dict(backend=backend, filter_eps=filter_eps, chunk_size=chunk_size)
    if grad_in_forward is not None:
        primitive_options["grad_in_forward"] = grad_in_forward
    patch = _Patch(causal_lm, head, temperature=temperature,
                   outputs=check_outputs(outputs), cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                   primitive_options=primitive_options)
    head.forward = patch.head_forward
    model.register_forward_pre_hook(patch.before_forward, with_kwargs=True)
    model.register_forward_hook(patch.after_forward, with_kwargs=True)
    model._fused_losses_patch = patch
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """Whether :func:`patch_causal_lm` patched ``model`` (this module, not a wrapper of it)."""
    return isinstance(vars(model).get("_fused_losses_patch"), _Patch)


def unpatch_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch_causal_lm`: the stock head forward, no hooks; returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"model ({type(model).__name__}) is not patched by patch_causal_lm")
    patch = vars(model).pop("_fused_losses_patch")
    if vars(patch.head).get("forward") == patch.head_forward:
        del patch.head.forward
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is patch]:
            del hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
            model._forward_hooks_with_kwargs.pop(key, None)
    return model


def add_fused_lm_head(model: torch.nn.Module, temperature: float = 1.0,
                      cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's ``add_fused_lm_head`` with TRL's signature, on our kernels.

    ``model(..., labels=labels, fused_lm_head=True)`` then returns
    :class:`~fused_losses.integrations.trl.FusedCausalLMOutput`; calls without ``fused_lm_head`` get the stock model's
    outputs (with labels: its loss, fused, ``logits=None``). Equivalent to
    ``patch_causal_lm(model, temperature=..., cast_lm_head_to_fp32=..., outputs=...)``.
    """
    patch_causal_lm(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
                    outputs=outputs)


def patch_trainer(trainer, **options):
    """Patch a TRL (or HF) trainer's policy and reference models; returns the trainer.

    Both must run the same head: a policy on our kernels against a reference on TRL's
    would start DPO at a margin of rounding noise instead of exactly 0. Models already
    patched are left as they are. ``options`` go to :func:`fused_losses.patch_causal_lm`.
    """
    for name in ("model", "ref_model"):
        model = getattr(trainer, name, None)
        if model is not None and not is_patched(model):
            patch_causal_lm(model, **options)
    return trainer
