"""A run's model and what it trains, placed on a mesh: what training, scoring and export share.

``place(config)`` builds one fresh (the base model, new adapters); ``load(workdir)`` restores the
latest checkpoint of a ``dora_jax.train`` run; ``load_adapter(adapter_dir, base_dir)`` reads a
PEFT adapter over its base model. None of them reads data or builds an optimizer.

What trains is one tree, ``trainable = {"adapters": ..., "params": ...}``: the adapters (None
when ``train.finetune="full"``) and the base params trained in full (all of them for full
fine-tuning; a classifier's new head next to adapters, as PEFT's ``modules_to_save``; otherwise
none), split from the frozen rest by ``optim.partition`` with the mask of ``what_trains``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections

from dora_jax import io, models, optim, parallel, run_config
from dora_jax.base_model import abstract_base, base_module, load_base
from dora_jax.core import AdapterConfig, init_adapters, merge, quantize
from dora_jax.errors import ConfigError, InjectError
from dora_jax.inject import describe, inject, merged_targets
from dora_jax.io import checkpoints

log = logging.getLogger("dora_jax.runs")
FORMATS = ("peft", "merged")  # how a run is exported


def what_trains(model: Any, params: Any, finetune: str) -> Any:
    """Bool tree over ``params``: the leaves trained in full (``train.finetune``; a classifier's head)."""
    if finetune == "full":
        return jax.tree.map(lambda _: True, params)
    head = models.family(model).head
    return optim.trainable_mask(params, extra=(f"{head}/.*",) if head else ())


def make_apply(model: Any, adapter_cfg: AdapterConfig | None):
    """apply(trainable, frozen, ids, **kw) -> the model's output on ``ids``, with the adapters through
    ``inject`` (none when ``adapter_cfg`` is None); ``kw`` go to ``apply``."""
    adapted = None if adapter_cfg is None else inject(model.apply, adapter_cfg)

    def apply(trainable, frozen, ids, **kwargs):
        params = optim.combine(trainable["params"], frozen)
        if adapted is None:
            return model.apply({"params": params}, ids, **kwargs)
        return adapted(params, trainable["adapters"], ids, **kwargs)

    return apply


def make_forward(model: Any, adapter_cfg: AdapterConfig | None):
    """forward(trainable, frozen, batch, rng) -> output: ``make_apply`` on a batch (the inputs its
    model family reads), adapter dropout from ``rng`` (None: none)."""
    names = models.family(model).inputs
    apply = make_apply(model, adapter_cfg)

    def forward(trainable, frozen, batch, rng):
        kwargs = {k: batch[k] for k in names}
        if adapter_cfg is not None:
            kwargs["dropout_rng"] = rng
        return apply(trainable, frozen, batch["inputs"], **kwargs)

    return forward


def lm_forward(model: Any, adapter_cfg: AdapterConfig | None):
    """forward((frozen, trainable), ids, **kw): ``make_apply`` in the form ``generate`` takes."""
    apply = make_apply(model, adapter_cfg)
    return lambda params, ids, **kwargs: apply(params[1], params[0], ids, **kwargs)


@dataclasses.dataclass
class LoadedRun:
    """A model with what it trains, placed on a mesh (``trainable``, ``frozen`` and their shardings)."""

    config: ml_collections.ConfigDict
    mesh: Any
    model: Any
    adapter_cfg: AdapterConfig | None  # None: full fine-tuning
    trainable: Any  # {"adapters": ..., "params": ...}
    frozen: Any  # the params that do not train (None where trainable["params"] holds a leaf)
    trainable_sharding: Any
    frozen_sharding: Any
    step: int = 0  # the checkpoint step it was restored from (0: fresh)

    @property
    def batch_sharding(self) -> Any:
        return parallel.batch_sharding(self.mesh)

    @property
    def head(self) -> Any:
        """The trained head of a classifier with adapters (PEFT's modules_to_save), else None."""
        head = models.family(self.model).head
        return None if head is None or self.adapter_cfg is None else self.trainable["params"][head]

    def params(self) -> Any:
        """Every parameter, trained and frozen, on the host, layer by layer as HF names them
        (``layers_{i}``, also for a model that scans stacked layers)."""
        return models.unrolled(self.model, jax.device_get(optim.combine(self.trainable["params"], self.frozen)))

    def adapters(self) -> Any:
        """The adapters on the host, layer by layer as ``params`` (None for full fine-tuning)."""
        adapters = self.trainable["adapters"]
        return None if adapters is None else models.unrolled(self.model, jax.device_get(adapters))

    def merged_params(self) -> Any:
        """The params with the adapters folded in (W' = m V'/||V'||): a plain model, on the host,
        layer by layer as ``params``; a quantized base's kernels dequantized (to ``model.dtype``), as
        PEFT's merge_and_unload gives them from a 4-bit base."""
        params = self.params()
        if self.adapter_cfg is not None:
            params = merge(params, self.adapters(), self.adapter_cfg)
        return quantize.dequantize_tree(params)

    def jit_metric(self, metric: Any) -> Any:
        """(trainable, frozen, batch) -> metric(output, batch), jitted, batches split over the mesh."""
        forward = make_forward(self.model, self.adapter_cfg)
        return jax.jit(
            parallel.under_mesh(
                lambda trainable, frozen, batch: metric(forward(trainable, frozen, batch, None), batch), self.mesh
            ),
            in_shardings=(self.trainable_sharding, self.frozen_sharding, self.batch_sharding),
            out_shardings=parallel.replicated(self.mesh),
        )

    def scorer(self, metric: Any) -> Any:
        """batch -> metric(output, batch) of this run's trained state (``jit_metric``)."""
        return functools.partial(self.jit_metric(metric), self.trainable, self.frozen)

    def export(self, fmt: str, out: str | pathlib.Path) -> pathlib.Path:
        """Writes ``out``: "peft", the adapter (with a classifier's head), or "merged", the HF model with
        the adapter folded in (for full fine-tuning, the fine-tuned model itself)."""
        if fmt not in FORMATS:
            raise ConfigError(f"export format: expected one of {FORMATS}; got {fmt!r}")
        if pathlib.Path(out).exists() and not pathlib.Path(out).is_dir():
            raise ConfigError(f"{out} is a file; the export is a directory: give a new or existing directory")
        if fmt == "peft" and self.adapter_cfg is None:
            raise ConfigError("a full fine-tuning run has no adapter to write as PEFT; export it with format merged")
        if fmt == "merged":
            return io.save_hf(self.model, self.merged_params(), out)
        return io.export_peft(
            self.adapters(),
            self.adapter_cfg,
            out,
            model=self.model,
            base_model_name_or_path=self.config.model.hf_dir or None,
            head=jax.device_get(self.head),
        )


def new_adapters(model: Any, cfg: AdapterConfig, rng: jax.Array, params: Any) -> Any:
    """``init_adapters`` in the model's layout: per HF layer, stacked again for a scanned model (so
    that its adapters start as the unrolled model's do)."""
    return models.in_layout(model, init_adapters(rng, models.unrolled(model, params), cfg))


def make_mesh(config: ml_collections.ConfigDict) -> Any:
    """The (data, fsdp, tensor) mesh of ``config.mesh``; joins the hosts first with ``distributed``."""
    if config.distributed:
        jax.distributed.initialize()
    return parallel.make_mesh({axis: config.mesh[axis] for axis in parallel.AXES})


def report_merged_targets(model: Any, params: Any, adapters: Any, adapter_cfg: AdapterConfig) -> dict[str, str]:
    """Logs, once, every target the adapted forward cannot run and merges (builds W') instead, with
    the reason; with ``adapter.fallback=error`` that is an InjectError naming them."""
    merged = merged_targets(model.apply, adapter_cfg, params, adapters, *models.dummy_inputs(model))
    if merged and adapter_cfg.fallback == "error":
        raise InjectError(f"adapter.fallback=error and targets the adapted forward cannot run: {describe(merged)}")
    for path, why in merged.items():
        log.warning("target %s is merged into the kernel at every step (W' built): %s", path, why)
    return merged


def place(config: ml_collections.ConfigDict, mesh: Any = None) -> LoadedRun:
    """The base model of ``config`` with new adapters (seeded by ``config.seed``), on ``mesh``
    (default: ``make_mesh(config)``); checks ``config`` first."""
    run_config.check(config)
    model, params = load_base(config)
    return _place(config, mesh, model, params)


def place_abstract(config: ml_collections.ConfigDict, mesh: Any = None) -> LoadedRun:
    """``place`` on shapes: every tree holds ``jax.ShapeDtypeStruct`` with its sharding, from the base
    model's config alone; nothing is read or allocated (what scripts/memory_plan.py compiles)."""
    run_config.check(config)
    model, params = abstract_base(config)
    return _place(config, mesh, model, params, materialize=False)


def _place(config, mesh, model, params, materialize=True) -> LoadedRun:
    """``place`` (arrays put on the mesh) or ``place_abstract`` (``materialize=False``: shapes)."""
    put = jax.device_put if materialize else abstract
    mesh = make_mesh(config) if mesh is None else mesh
    rules = parallel.rules_from(config.mesh.rules)
    logical = models.logical_axes(model)
    param_sharding = parallel.param_shardings(logical, params, mesh, rules)
    params = put(params, param_sharding)
    adapter_cfg = run_config.adapter_config(config)
    mask = what_trains(model, params, config.train.finetune)
    trained, frozen = optim.partition(params, mask)
    trained_sharding, frozen_sharding = optim.partition(param_sharding, mask)
    adapters = adapter_sharding = None
    if adapter_cfg is not None:
        init = functools.partial(new_adapters, model, adapter_cfg, jax.random.key(config.seed))
        # Op by op (each op's program is reused by every later run of the process), except for a scanned
        # model: compiled once the shardings are known, so that its layers are sliced without a copy.
        compiled = materialize and models.scans_layers(model)
        adapters = init(params) if materialize and not compiled else jax.eval_shape(init, params)
        report_merged_targets(model, params, adapters, adapter_cfg)
        adapter_sharding = parallel.adapter_shardings(adapters, logical, mesh, rules)
        if compiled:
            adapters = jax.jit(init, out_shardings=adapter_sharding)(params)
        adapters = put(adapters, adapter_sharding)
    return LoadedRun(
        config,
        mesh,
        model,
        adapter_cfg,
        {"adapters": adapters, "params": trained},
        frozen,
        {"adapters": adapter_sharding, "params": trained_sharding},
        frozen_sharding,
    )


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config of the ``dora_jax.train`` run in ``workdir`` (its ``config.json``)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: no such file; is {workdir} the --workdir of a dora_jax.train run?")
    return run_config.from_flat(json.loads(path.read_text()))


def abstract(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` with ``shardings``: what a checkpoint is restored into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load(workdir: str | pathlib.Path, mesh: Any = None) -> LoadedRun:
    """The run in ``workdir`` at its latest checkpoint (trained state only: no optimizer state)."""
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    directory = workdir / "checkpoints"
    step = checkpoints.latest_step(directory)
    if step is None:
        raise ConfigError(f"{directory}: no checkpoint yet")
    run = place(config, mesh)
    if is_current_layout(checkpoints.stored_trainable(directory, step)):
        run.trainable = checkpoints.restore_trainable(directory, step, abstract(run.trainable, run.trainable_sharding))
    else:
        run.trainable = _restore_earlier_layout(run, directory, step)
    run.step = step
    return run


def is_current_layout(stored: Any) -> bool:
    """Whether a checkpoint's trainable tree is ``{"adapters", "params"}`` (not an earlier version's)."""
    return isinstance(stored, dict) and set(stored) == {"adapters", "params"}


def _restore_earlier_layout(run: LoadedRun, directory: pathlib.Path, step: int) -> Any:
    """The trained state of a checkpoint written before ``{"adapters", "params"}``: the params (full
    fine-tuning), ``{"adapters", "head"}`` (a classifier) or the adapters alone."""
    adapters, trained = run.trainable["adapters"], run.trainable["params"]
    adapter_sharding, trained_sharding = run.trainable_sharding["adapters"], run.trainable_sharding["params"]
    head = models.family(run.model).head
    if adapters is None:
        return {"adapters": None, "params": _restore(directory, step, trained, trained_sharding)}
    if head is not None:
        tree = {"adapters": adapters, "head": trained[head]}
        restored = _restore(directory, step, tree, {"adapters": adapter_sharding, "head": trained_sharding[head]})
        return {"adapters": restored["adapters"], "params": {**trained, head: restored["head"]}}
    return {"adapters": _restore(directory, step, adapters, adapter_sharding), "params": trained}


def _restore(directory: pathlib.Path, step: int, tree: Any, shardings: Any) -> Any:
    return checkpoints.restore_trainable(directory, step, abstract(tree, shardings))


def load_adapter(
    adapter_dir: str | pathlib.Path, base_dir: str | pathlib.Path | None, cutoff_len: int = 256, mesh: Any = None
) -> LoadedRun:
    """A PEFT adapter directory (ours or PEFT's; a SEQ_CLS one with its head) over the local HF base
    model it was trained on, placed as ``dora_jax.train`` places a run; ``cutoff_len`` bounds the
    tokens per scored sequence (``config.data.cutoff_len``)."""
    if not base_dir:
        raise ConfigError("an adapter needs its base model: the HF directory of the model it was trained on")
    head = io.read_peft_head(adapter_dir)
    config = run_config.defaults()
    config.model.update(hf_dir=str(base_dir), num_labels=0 if head is None else int(head["bias"].shape[0]))
    model = base_module(config)
    adapters, cfg = io.import_peft(adapter_dir, models.abstract_params(model), model=model)
    config.adapter.update(cfg.to_dict())
    config.data.cutoff_len = cutoff_len
    run = place(config, mesh)
    trained = run.trainable["params"] if head is None else {**run.trainable["params"], models.family(model).head: head}
    run.trainable = jax.device_put({"adapters": adapters, "params": trained}, run.trainable_sharding)
    return run
