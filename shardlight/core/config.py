"""The run config: one typed schema, validated once at the edge (unknown keys are errors).

Workers and the index receive these objects (or plain values from them); they never read
configuration files themselves. Relative paths in a YAML file are resolved against that file's folder.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shardlight.core.errors import InputError, first_line
from shardlight.core.storage import is_local

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClipSpec(_Strict):
    model: str = "shapes-clip"  # open_clip architecture name (built-in, or a JSON in configs/models/)
    pretrained: str | None = None  # open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local weights file
    seed: int = 0  # initialises an untrained model identically on every worker


class LabelSpec(_Strict):
    kind: Literal["vit", "zeroshot", "none"] = "vit"  # timm classifier, CLIP zero-shot prompts, or no labels
    model: str = "shapes-vit"  # timm model name, or a JSON in configs/models/ (used by kind=vit)
    pretrained: bool = False  # timm hub weights (needs network or a warm HF cache)
    checkpoint: str | None = None  # local .safetensors (or weights-only .pt) classifier weights
    class_names: list[str] | str | None = None  # names, or a text file with one per line
    prompt: str = "a photo of a {}"  # zero-shot template; {} is the class name
    top_k: int = Field(5, ge=1)  # how many (id, prob) pairs are kept per row besides the top-1


class ComputeSpec(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the worker has a GPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on GPU; CPU: docs/benchmarks.md
    batch_size: int | None = Field(None, ge=1)  # None: from free GPU memory (512 on an idle 80 GB GPU), 32 on CPU
    prefetch_batches: int = Field(4, ge=1)  # decoded batches queued ahead of the model
    threads: int | None = Field(None, ge=1)  # torch threads; None: the CPUs the worker holds (Ray's share)
    decode: Literal["auto", "cpu", "gpu"] = "auto"  # where images are decoded (gpu: issue 19's decoder)
    decode_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"  # CPU decode processes; 0: in the feeding thread
    decode_schedule: Literal["auto", "beside", "between"] = "auto"  # CPU decoding beside the model or between its batches
    jpeg_draft: bool = False  # decode JPEGs >= 2x the input at reduced scale (agreement: docs/benchmarks.md)


class RaySpec(_Strict):
    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001" for a cluster
    num_cpus: int | None = None  # CPUs a local Ray may use (None: all)
    num_actors: int | None = Field(None, ge=1)  # None: one per GPU, or one CPU actor per 2 CPUs
    min_actors: int = Field(1, ge=1)  # start once this many are up; the rest join as the autoscaler adds nodes
    max_actors: int | None = Field(None, ge=1)  # cap on the automatic size (None: no cap)
    start_timeout_s: float = Field(300.0, gt=0)  # give up, in one line, if min_actors cannot start by then
    cpus_per_actor: float | None = Field(None, gt=0)  # None: a CPU actor's share of its node, see docs/operations.md
    gpus_per_actor: float = Field(1.0, ge=0)  # asked for only when the cluster has GPUs
    max_retries_per_shard: int = Field(2, ge=0)  # a shard whose actor died is retried this often
    decode_cpus: float = Field(0.0, ge=0)  # extra CPUs reserved per actor for its decode thread


class IndexSpec(_Strict):
    build: bool = True  # build the FAISS index after embedding
    factory: str = "Flat"  # FAISS index_factory string (Flat, HNSW32, IVF1024,Flat, OPQ64,IVF4096,PQ64, …)
    train_sample: int = Field(100_000, ge=1)  # vectors sampled to train quantizers
    nprobe: int | None = Field(None, ge=1)  # IVF search breadth (None: FAISS default)
    synthetic: bool = True  # also index the augment stage's generated rows (false: input rows only)
    parts: bool = False  # build an IVF index in parts on the run's Ray cluster, lists merged on disk (index/parts.py)
    part_rows: int = Field(1_000_000, ge=1)  # rows per part


class AugmentSpec(_Strict):
    enabled: bool = False  # run the DiT augmentation stage after embedding
    model: str = "DiT-Tiny/4"  # DIT_MODELS name for a published .pt (DiT-XL/2); a demo .safetensors carries its own
    checkpoint: str | None = None  # local DiT weights: the demo .safetensors or a published .pt
    vae: str | None = None  # local diffusers AutoencoderKL folder, needed by latent models (DiT-XL/2-256)
    modes: list[Literal["generate", "vary"]] = ["generate", "vary"]  # which augmentations to make
    generate_per_class: int = Field(2, ge=0)  # generate: new images per class present in the shard
    vary_sources: int = Field(2, ge=0)  # vary: source images per shard (the first ones with a known label)
    vary_per_source: int = Field(2, ge=0)  # vary: variations of each source image
    classes: list[str] | None = None  # generate for these class names instead of the shard's ViT labels
    strength: float = Field(0.6, gt=0, le=1)  # vary: SDEdit noise level (0 keeps the source, 1 ignores it)
    steps: int | None = Field(None, ge=1)  # DDIM steps (None: the checkpoint's default)
    guidance: float | None = Field(None, ge=0)  # classifier-free guidance scale (None: the checkpoint's default)
    min_clip_score: float | None = None  # drop (and count) images whose CLIP score vs class prompt is lower
    prompt: str = "a photo of a {}"  # class prompt for CLIP scoring; {} is the class name
    seed: int = 0  # mixed into every image's seed, itself derived from (source key or class, index)
    batch_size: int = Field(32, ge=1)  # images denoised together (guidance doubles the model batch)


class RunConfig(_Strict):
    input: str | list[str] | None = None  # shards: path, directory, glob, {000..009} pattern or fsspec URL
    output: str | None = None  # output folder or URL
    clip: ClipSpec = ClipSpec()
    labels: LabelSpec = LabelSpec()
    compute: ComputeSpec = ComputeSpec()
    ray: RaySpec = RaySpec()
    index: IndexSpec = IndexSpec()
    augment: AugmentSpec = AugmentSpec()


def _resolve(value: str | None, base: Path) -> str | None:
    """A relative path that exists beside the config file wins over the same path from the cwd."""
    if value is None or not is_local(value) or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate) if candidate.exists() else value


def _keys_at(loc: tuple) -> list[str]:
    """The keys allowed beside the last element of `loc` (a path of section names into RunConfig)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), _keys_at(first["loc"]), n=1, cutoff=0.6)
        prefix = ".".join(str(p) for p in first["loc"][:-1])
        hint = f" (did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?)" if close else ""
        return f"unknown key {where!r}{hint}"
    return f"{where}: {first['msg']}"


def parse_config(data: dict, source: str = "config", base: Path | None = None) -> RunConfig:
    """Validate a config mapping; any problem becomes one InputError line naming the key."""
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as err:
        extra = len(err.errors()) - 1
        more = f" (and {extra} more)" if extra else ""
        raise InputError(f"{source}: {_first_error(err)}{more}") from None
    if base is None:
        return cfg
    clip = cfg.clip.model_copy(update={"pretrained": _resolve(cfg.clip.pretrained, base)})
    names = cfg.labels.class_names
    labels = cfg.labels.model_copy(update={
        "checkpoint": _resolve(cfg.labels.checkpoint, base),
        "class_names": _resolve(names, base) if isinstance(names, str) else names,
    })
    augment = cfg.augment.model_copy(update={
        "checkpoint": _resolve(cfg.augment.checkpoint, base), "vae": _resolve(cfg.augment.vae, base)})
    return cfg.model_copy(update={"clip": clip, "labels": labels, "augment": augment})


def _yaml_where(err: yaml.YAMLError) -> str:
    """` at line L, column C: problem` for a YAML syntax error (PyYAML counts from 0)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or first_line(err, with_type=False)
    if mark is None:
        return f" ({problem})"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def load_config(path: str | Path, **overrides) -> RunConfig:
    """Read a YAML run config; `overrides` (e.g. input=, output=) replace top-level keys when not None."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML{_yaml_where(err)}") from None
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(data, source=str(path), base=path.resolve().parent)


def with_ray_address(cfg: RunConfig, address: str | None) -> RunConfig:
    if address is None:
        return cfg
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": address})})
