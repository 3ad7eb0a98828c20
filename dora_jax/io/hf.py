"""HF checkpoints in and out: a local directory with config.json and *.safetensors.

``load_hf(dir)`` builds the zoo model its ``config.json`` names and reads every parameter
tensor by tensor (memory-mapped), transposing PyTorch (out, in) weights to Flax (in, out)
kernels; ``save_hf(model, params, dir)`` writes the same layout back, shard by shard.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from dora_jax import models, targets
from dora_jax.core import quantize as core_quantize
from dora_jax.errors import ConfigError, ShapeError
from dora_jax.io.safetensors_dir import INDEX, CheckpointError, SafetensorsDirectory

log = logging.getLogger(__name__)

# Leaves that HF itself initialises when a checkpoint lacks them (e.g. roberta-base has no pooler).
# Leaves HF initialises when a checkpoint lacks them (a base encoder loaded as a classifier).
OPTIONAL_LEAVES = re.compile(r"(bert/)?pooler/dense/(kernel|bias)|classifier/(kernel|bias)")
# Buffers some checkpoints carry that are not parameters.
BUFFERS = re.compile(r".*(position_ids|rotary_emb\.inv_freq|masked_bias|attn\.bias)$")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "tokenizer.model",
    "added_tokens.json",
)


def read_config(hf_dir: str | pathlib.Path) -> dict[str, Any]:
    """The ``config.json`` dict of an HF directory."""
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; an HF model directory needs config.json")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _resolve(tensors: SafetensorsDirectory, name: str, model_type: str) -> str | None:
    """The checkpoint's name for ``name``: as is, under a task model's ``<model_type>.`` prefix, or without it."""
    prefix = f"{model_type}."
    for candidate in (name, prefix + name, name.removeprefix(prefix)):
        if candidate in tensors:
            return candidate
    return None


def classifier_config(config: dict[str, Any], num_labels: int) -> dict[str, Any]:
    """An encoder's HF config dict as a BertForSequenceClassification with ``num_labels`` labels."""
    labels = config.get("id2label") or {}
    return {
        **config,
        "architectures": ["BertForSequenceClassification"],
        "id2label": labels if len(labels) == num_labels else {str(i): f"LABEL_{i}" for i in range(num_labels)},
    }


def load_hf(
    hf_dir: str | pathlib.Path,
    dtype: Any = jnp.float32,
    compute_dtype: Any = None,
    num_labels: int = 0,
    remat: str = "none",
    scan_layers: bool = False,
    attention: str = "auto",
    quantize: str = "none",
    quantize_block: int | None = None,
) -> tuple[Any, Any]:
    """(Flax module, params) of a local HF directory of a Llama- or BERT-family model.

    ``dtype`` is the dtype of the params; ``compute_dtype`` (default: ``dtype``) the dtype
    activations are computed in, e.g. float32 params with bfloat16 compute. ``num_labels > 0``
    loads a BERT-family encoder as a sequence classifier with that many labels; a classifier
    head (or pooler) the checkpoint lacks is initialised as HF does (normal(0.02), zero bias).
    ``remat`` recomputes Llama layers in the backward pass (``models.llama.REMAT``); ``scan_layers``
    builds them as one ``nn.scan`` and returns their params stacked (read layer by layer, then stacked);
    ``attention`` picks the attention implementation (``models.layers.ATTENTIONS``). ``quantize``
    ("nf4" or "int8", ``core.quantize``; ``quantize_block`` inputs per scale, 0: one per output column,
    int8 only; None: bitsandbytes' default, 64 for NF4, per column for int8) stores every linear kernel
    but the head's quantized, each as it is read, so that the checkpoint is never held at full
    precision as a whole.
    """
    quantize_block = core_quantize.block_for(quantize, quantize_block)
    hf_dir = pathlib.Path(hf_dir)
    config = read_config(hf_dir)
    if num_labels:
        config = classifier_config(config, num_labels)
    try:
        model = models.from_hf_config(
            config,
            dtype=compute_dtype or dtype,
            param_dtype=dtype,
            remat=remat,
            scan_layers=scan_layers,
            attention=attention,
        )
    except ConfigError as err:
        raise ConfigError(f"{hf_dir / 'config.json'}: {err}") from None
    table = models.hf_table(model)
    tensors = SafetensorsDirectory(hf_dir)
    model_type = config.get("model_type", "")
    used: set[str] = set()

    def load(keypath: Any, abstract: jax.ShapeDtypeStruct) -> Any:
        path = targets.path_str(keypath)
        before, _, rest = path.partition(f"{models.LAYERS}/")
        if models.scans_layers(model) and not before and rest:  # layer by layer on the host, one transfer
            layer = jax.ShapeDtypeStruct(abstract.shape[1:], abstract.dtype)
            paths = [f"{models.LAYERS}_{i}/{rest}" for i in range(abstract.shape[0])]
            if quantize != "none" and models.is_base_kernel(model, paths[0]):
                return jax.tree.map(lambda *codes: jnp.stack(codes), *[converted(p, layer) for p in paths])
            return jnp.asarray(np.stack([read(p, layer) for p in paths]), dtype)
        return converted(path, abstract)

    def converted(path: str, abstract: jax.ShapeDtypeStruct) -> Any:
        array = jnp.asarray(read(path, abstract), dtype)
        if quantize == "none" or not models.is_base_kernel(model, path):
            return array
        return core_quantize.quantize_kernel(array, quantize, quantize_block, path=path)

    def read(path: str, abstract: jax.ShapeDtypeStruct) -> Any:
        name, transposed = models.hf_tensor(path, table)
        found = _resolve(tensors, name, model_type)
        expected = tuple(reversed(abstract.shape)) if transposed else tuple(abstract.shape)
        if found is None:
            if OPTIONAL_LEAVES.fullmatch(path):
                log.warning("%s: no tensor %s; initialising %s randomly as HF does", hf_dir, name, path)
                key = jax.random.key(zlib.crc32(path.encode()))
                return (
                    jnp.zeros(abstract.shape, dtype)
                    if path.endswith("bias")
                    else 0.02 * jax.random.normal(key, abstract.shape, dtype)
                )
            raise CheckpointError(
                f"{hf_dir}: tensor {name!r} (Flax leaf {path!r}, shape {expected}) is missing from the checkpoint"
            )
        used.add(found)
        if tensors.shape(found) != expected:
            raise ShapeError(
                f"{hf_dir}: tensor {found!r} has shape {tensors.shape(found)}, but config.json implies {expected} "
                f"(Flax leaf {path!r} of shape {tuple(abstract.shape)})"
            )
        array = tensors.read(found)
        return array.T if transposed else array

    params = jax.tree_util.tree_map_with_path(load, models.abstract_params(model))
    unused = [name for name in tensors.names() if name not in used and not BUFFERS.fullmatch(name)]
    if unused:
        log.warning("%s: %d tensors not used by %s: %s", hf_dir, len(unused), type(model).__name__, unused[:20])
    return model, params


def quantize_base(model: Any, params: Any, scheme: str, block_size: int | None = None) -> Any:
    """``params`` of a zoo ``model`` (arrays or shapes) with the kernels ``load_hf(quantize=scheme)``
    quantizes quantized (``core.quantize``; ``block_size`` None: the scheme's default), layer by layer and
    stacked again for a scanning model; ``scheme="none"`` returns them unchanged."""
    kernels = models.family(model).base_kernels
    quantized = core_quantize.quantize_params(models.unrolled(model, params), scheme, block_size, kernels)
    return models.in_layout(model, quantized)


def _write_shards(tensors: list[tuple[str, np.ndarray]], out: pathlib.Path, max_shard_bytes: int) -> None:
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, array in tensors:
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, array))
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(dict(shards[0]), out / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(shard), out / file, metadata=metadata)
        weight_map.update({name: file for name, _ in shard})
    total = sum(array.nbytes for _, array in tensors)
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_hf(
    model: Any,
    params: Any,
    out_dir: str | pathlib.Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_dir: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Writes ``params`` of a zoo model (stacked layers or unrolled) as an HF directory (config.json +
    safetensors) that ``transformers`` loads; copies the tokenizer files of ``tokenizer_dir`` when given.

    Files are written to a temporary folder first and moved in at the end, so a failure
    leaves an existing directory as it was.
    """
    out_dir = pathlib.Path(out_dir)
    table = models.hf_table(model)
    tensors = []
    dtypes = set()
    for path, leaf in targets.leaves_by_path(models.unrolled(model, params)).items():
        name, transposed = models.hf_tensor(path, table)
        array = np.asarray(leaf)
        dtypes.add(array.dtype.name)
        tensors.append((name, np.ascontiguousarray(array.T if transposed else array)))
    config = models.hf_config(model)
    if len(dtypes) == 1:
        config["dtype"] = config["torch_dtype"] = dtypes.pop()  # transformers 5 reads "dtype", 4 "torch_dtype"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".partial-") as tmp:
        staging = pathlib.Path(tmp)
        _write_shards(tensors, staging, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (pathlib.Path(tokenizer_dir) / name).exists():
                    shutil.copy(pathlib.Path(tokenizer_dir) / name, staging / name)
        for stale in [*out_dir.glob("*.safetensors"), out_dir / INDEX]:
            if stale.exists():
                stale.unlink()
        for file in staging.iterdir():
            os.replace(file, out_dir / file.name)
    return out_dir


def load_tokenizer(hf_dir: str | pathlib.Path):
    """The ``tokenizers.Tokenizer`` of an HF directory's ``tokenizer.json`` (no network), with the
    padding and truncation the file may switch on turned off: dora_jax cuts and pads itself, and a
    tokenizer that pads every text to 128 tokens would cut every response (an all-zero loss mask)."""
    import tokenizers

    path = pathlib.Path(hf_dir) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; the tokenizer is read from tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer
