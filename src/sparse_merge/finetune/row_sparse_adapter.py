"""Row-sparse fine-tuning as an ``Adapter`` (``lora=row_sparse``): train a dense update on the
most important output rows of every targeted linear layer, optionally on an NF4 base.

``wrap`` does, in order:

1. scores every output row of every targeted layer of the (pruned, full-precision) model with
   ``importance``: ``magnitude`` (sum of ``|W|``), ``wanda`` (sum of ``|W| * ||X_j||``),
   ``gradient`` (sum of ``|dL/dW|``), ``taylor`` (sum of ``|W * dL/dW|``; both with gradients
   from calibration batches), ``zo_taylor``
   (zeroth-order Taylor: SPSA estimates from ``n_estimate`` pairs of perturbed forward passes,
   no backward pass; see ``zo_scope``) or ``random`` (seeded);
2. keeps the top ``k`` rows per layer: ``k = rank`` when ``rank`` is set, otherwise the most
   rows whose update has no more parameters than a LoRA pair of rank ``lora_rank``,
   ``k * in <= lora_rank * (in + out)``;
3. with ``quantize: nf4`` replaces the layer's weight by its NF4 quantisation (pure torch,
   block-wise absmax); ``init: residual`` starts the update at the selected rows of ``W - Q(W)``,
   so those rows compute with the full-precision weight at step 0;
4. wraps the layer in a ``RowSparseLinear`` (only its ``delta`` [k, in] trains).

On a pruned base (``masks`` given) and ``respect_masks: true``, the update is multiplied by the
keep-mask of its rows in the forward, the merge and the saved file, so every pruned weight is
exactly zero after the merge; the trainable-parameter count still counts the whole ``[k, in]``
tensor (its masked entries get zero gradient). ``respect_masks: false`` trains dense rows and
the merge fills pruned weights of the selected rows (like dense LoRA).

``merge`` writes ``W[rows] += delta`` (on ``Q(W)`` for an NF4 base, so the merged model holds the
dequantised weights); ``save`` writes ``row_update.safetensors`` (rows and updates only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from sparse_merge.errors import ConfigError, check_choice, check_positive
from sparse_merge.finetune.nf4 import NF4Linear
from sparse_merge.finetune.row_selection import (
    random_rows,
    row_importance,
    rows_for_lora_rank,
    spsa_gradients,
    spsa_row_taylor,
    top_rows,
)
from sparse_merge.finetune.row_sparse import (
    RowSparseLinear,
    merge_row_sparse,
    row_sparse_modules,
    save_row_update,
)
from sparse_merge.models.blocks import PrunableLayer, prunable_layers
from sparse_merge.pruning.base import Calibration, Masks
from sparse_merge.pruning.importance import (
    GradientImportance,
    MagnitudeImportance,
    TaylorImportance,
    WandaImportance,
)

IMPORTANCES = ("magnitude", "wanda", "gradient", "taylor", "zo_taylor", "random")
DATA_IMPORTANCES = ("wanda", "gradient", "taylor", "zo_taylor")
QUANTIZE = ("none", "nf4")
INITS = ("zeros", "residual")
ZO_SCOPES = ("row", "weight")
UPDATE_FILE = "row_update.safetensors"


def calibration_loss(
    model: nn.Module, calib: Calibration, n_batches: int, batch_size: int
) -> Callable[[], torch.Tensor]:
    """A closure: the mean LM loss of ``model`` over the first ``n_batches`` calibration batches,
    on the targets the gradient scores use (``calib.loss_labels()``: the answer tokens with
    ``calibration.answer_loss``, else every token; it scored every token whatever the
    setting, so ``zo_taylor`` estimated another loss's Taylor sums than ``taylor``)."""
    labels = calib.loss_labels()  # [N, T]
    batches = [
        (ids, attn, labels[i : i + batch_size])
        for (ids, attn), i in zip(calib.batches(batch_size), range(0, len(calib), batch_size))
    ][:n_batches]
    device = next(model.parameters()).device

    @torch.no_grad()
    def loss() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for ids, attn, lab in batches:
            ids, attn, lab = ids.to(device), attn.to(device), lab.to(device)
            out = model(input_ids=ids, attention_mask=attn, labels=lab)
            total += out.loss.float()
        return total / len(batches)

    return loss


class RowSparseAdapter:
    """Row-sparse fine-tuning of the targeted linear layers (see the module docstring).
    ``mask_path``: a saved mask directory used instead of the pipeline's pruner;
    ``mask_check=False`` applies its masks even when their ``source_hash`` is another model's."""

    uses_calibration = True  # the pipeline passes ``calib`` to ``wrap``

    def __init__(
        self,
        importance: str = "taylor",
        rank: int | None = None,
        lora_rank: int | None = 8,
        target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
        quantize: str = "none",
        block_size: int = 64,
        init: str = "zeros",
        respect_masks: bool = True,
        n_estimate: int = 64,
        eps: float = 1e-2,
        zo_scope: str = "row",
        n_batches: int = 4,
        batch_size: int = 8,
        mask_path: str | None = None,
        seed: int = 0,
        mask_check: bool = True,
    ) -> None:
        self.importance = check_choice("importance", importance, IMPORTANCES)
        if rank is None and lora_rank is None:
            raise ConfigError("lora_rank", lora_rank, "a LoRA rank >= 1 when rank is null")
        self.rank = None if rank is None else int(check_positive("rank", rank))
        self.lora_rank = None if lora_rank is None else int(check_positive("lora_rank", lora_rank))
        if self.rank is not None:
            self.lora_rank = None  # rows per layer win over the LoRA-equivalent budget
        if not target_modules:
            raise ConfigError("target_modules", target_modules, "one or more module names")
        self.target_modules = list(target_modules)
        self.quantize = check_choice("quantize", quantize, QUANTIZE)
        self.block_size = int(check_positive("block_size", block_size))
        self.init = check_choice("init", init, INITS)
        if self.init == "residual" and self.quantize == "none":
            raise ConfigError("init", init, "'zeros' unless quantize=nf4 (no residual otherwise)")
        self.respect_masks = bool(respect_masks)
        self.n_estimate = int(check_positive("n_estimate", n_estimate))
        self.eps = float(check_positive("eps", eps))
        self.zo_scope = check_choice("zo_scope", zo_scope, ZO_SCOPES)
        self.n_batches = int(check_positive("n_batches", n_batches))
        self.batch_size = int(check_positive("batch_size", batch_size))
        self.mask_path = mask_path
        self.mask_check = bool(mask_check)
        self.seed = int(check_positive("seed", seed, allow_zero=True))
        self.name = f"row_sparse_{self.importance}"

    # ---- selection -------------------------------------------------------------------------

    def target_layers(self, model: nn.Module) -> list[PrunableLayer]:
        """The decoder-block linears whose last name part is in ``target_modules``."""
        layers = [
            layer
            for layer in prunable_layers(model)
            if layer.name.rsplit(".", 1)[-1] in self.target_modules
        ]
        if not layers:
            raise ConfigError(
                "target_modules", self.target_modules, "names of linear layers in the model"
            )
        others = [layer.name for layer in layers if not isinstance(layer.module, nn.Linear)]
        if others:
            raise NotImplementedError(f"row_sparse needs nn.Linear layers; got {others[:3]}")
        return layers

    def rows_per_layer(self, layer: PrunableLayer) -> int:
        """The row budget ``k`` of one layer."""
        out, inp = layer.weight.shape
        if self.rank is not None:
            if self.rank > out:
                raise ConfigError("rank", self.rank, f"at most {out} (rows of {layer.name})")
            return self.rank
        return rows_for_lora_rank(out, inp, self.lora_rank)

    def row_scores(
        self, model: nn.Module, layers: list[PrunableLayer], calib: Calibration | None
    ) -> dict[str, torch.Tensor]:
        """Importance [out] of every row of every layer, by layer name (not for ``random``)."""
        if self.importance in DATA_IMPORTANCES and (calib is None or len(calib) == 0):
            raise ValueError(f"row_sparse importance={self.importance!r} needs calibration data")
        if self.importance == "zo_taylor":
            loss = calibration_loss(model, calib, self.n_batches, self.batch_size)
            gen = torch.Generator().manual_seed(self.seed)
            weights = [layer.module.weight for layer in layers]
            if self.zo_scope == "row":
                est = spsa_row_taylor(weights, loss, self.n_estimate, self.eps, gen)
                return {layer.name: e.double().abs() for layer, e in zip(layers, est)}
            grads = spsa_gradients(weights, loss, self.n_estimate, self.eps, gen)
            return {
                layer.name: row_importance((layer.weight.detach().float() * g).abs())
                for layer, g in zip(layers, grads)
            }
        scorer = {
            "magnitude": lambda: MagnitudeImportance(),
            "wanda": lambda: WandaImportance(self.n_batches * self.batch_size, self.batch_size),
            "gradient": lambda: GradientImportance(self.n_batches, self.batch_size),
            "taylor": lambda: TaylorImportance(self.n_batches, self.batch_size),
        }[self.importance]()
        scores = scorer.compute(model, calib)
        return {layer.name: row_importance(scores[layer.param_name]) for layer in layers}

    def select_rows(
        self, model: nn.Module, calib: Calibration | None = None
    ) -> dict[str, torch.Tensor]:
        """The selected rows [k] (ascending) of every targeted layer, by layer name."""
        layers = self.target_layers(model)
        if self.importance == "random":
            gen = torch.Generator().manual_seed(self.seed)
            rows = {
                layer.name: random_rows(layer.weight.shape[0], self.rows_per_layer(layer), gen)
                for layer in layers
            }
        else:
            scores = self.row_scores(model, layers, calib)
            rows = {
                layer.name: top_rows(scores[layer.name], self.rows_per_layer(layer))
                for layer in layers
            }
        return _same_on_every_process(rows)

    # ---- Adapter protocol ------------------------------------------------------------------

    def wrap(
        self, model: nn.Module, masks: Masks | None, calib: Calibration | None = None
    ) -> nn.Module:
        """``model`` (modified in place) with every targeted linear a ``RowSparseLinear``."""
        rows = self.select_rows(model, calib)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in tqdm(self.target_layers(model), desc="row_sparse: wrap", leave=False):
            linear = layer.module
            keep = masks.get(layer.param_name) if masks and self.respect_masks else None
            selected = rows[layer.name].to(linear.weight.device)
            row_mask = None if keep is None else keep.to(linear.weight.device)[selected]
            base = linear
            if self.quantize == "nf4":
                base = NF4Linear.from_linear(linear, self.block_size)
            module = RowSparseLinear(
                base, selected, init=self.init, full_weight=linear.weight, row_mask=row_mask
            )
            parent, _, child = layer.name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        """The plain model with ``W[rows] += delta`` in every wrapped layer (in place)."""
        if not row_sparse_modules(model):
            raise TypeError("no RowSparseLinear layers: pass the model returned by wrap")
        return merge_row_sparse(model)

    def save(self, model: nn.Module, directory: str | Path) -> Path:
        """``<directory>/row_update.safetensors``: rows and updates, with the base's
        quantisation in the header (``load_row_update`` applies it to a plain model)."""
        meta = {"quantize": self.quantize, "block_size": str(self.block_size)}
        meta["importance"] = self.importance
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        return save_row_update(model, directory / UPDATE_FILE, meta)

    def __repr__(self) -> str:
        budget = f"rank={self.rank}" if self.rank is not None else f"lora_rank={self.lora_rank}"
        return (
            f"RowSparseAdapter(importance={self.importance}, {budget}, quantize={self.quantize}, "
            f"init={self.init}, targets={self.target_modules})"
        )


def _same_on_every_process(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of process 0 on every process of a data-parallel run (scores computed on different
    devices may break ties differently); unchanged on a single process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    payload = [{k: v.cpu() for k, v in rows.items()}]
    torch.distributed.broadcast_object_list(payload, src=0)
    return payload[0]
