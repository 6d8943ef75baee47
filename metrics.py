"""The two automated metrics of Saharia et al. 2022, §3 ("FID to measure image fidelity, and CLIP
score to measure image-text alignment"), computed with the field's standard code: FID with
torch-fidelity (its TF-ported Inception-v3, the 2048-d pool features, its Frechet distance), the
CLIP score with transformers' CLIP. evaluate.py runs the paper's protocols on top of these.

One image pipeline for both sides of FID and for CLIP: decoded to RGB, the shortest side resized
(PIL bicubic, antialiased) and centre-cropped to the samples' side, kept as uint8 (samples are
written as PNG, lossless). The extractors then apply their own resize (Inception: TF1-style
bilinear to 299; CLIP: its processor's bicubic to 224).
"""

import hashlib
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import numpy as np
from PIL import Image
from tqdm import tqdm

import cli
import data

DOWNLOADS = {
    "inception": "curl -L -o ckpt/pt_inception-2015-12-05-6726825d.pth "
                 "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "clip": "hf download openai/clip-vit-large-patch14 --local-dir ckpt/clip-vit-large-patch14",
    "coco": "curl -LO http://images.cocodataset.org/zips/val2014.zip && curl -LO "
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip (unzip both into DIR)",
}


def missing(what, path):
    name = {"inception": "the Inception-v3 weights are", "clip": "the CLIP model is", "coco": "COCO 2014 val is"}[what]
    return cli.UserError(f"{path} is missing: {name} read from local files (nothing downloads at run "
                         f"time). Get {'them' if what == 'inception' else 'it'} once, on a machine with network:\n"
                         f"  {DOWNLOADS[what]}")


def device():
    """Where Inception and CLIP run: the GPU when torch sees one, else the CPU."""
    import torch  # noqa: PLC0415
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def versions():
    """The versions of the libraries that decide the numbers."""
    out = {}
    for name in ("jax", "flax", "torch", "torch-fidelity", "transformers", "pillow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# One image pipeline
# ---------------------------------------------------------------------------------------------

PIPELINE = "RGB; shortest side to SIDE, PIL bicubic (antialiased); centre crop; uint8"  # in the stats key


def to_side(img: Image.Image, side: int) -> np.ndarray:
    """An image -> uint8 (side, side, 3): RGB, shortest side to `side`, centre crop."""
    return np.asarray(data.center_crop(data.to_rgb(img), side), np.uint8)


# what to do about an image that cannot be read, by whose it is
REREAD = {"coco": "a reference image is never skipped (the FID's reference set would change): unzip "
                  f"val2014.zip again, or download it again:\n  {DOWNLOADS['coco']}",
          "sample": "delete it and run the same command again (missing samples are drawn again)"}


def read_images(paths, side, fix=REREAD["sample"]):
    """The images at `paths` through the pipeline, uint8 (N, side, side, 3); a file that cannot be
    decoded (empty, cut short, not an image) stops with its path and `fix`, what to do about it."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as img:
                out.append(to_side(img, side))
        except (OSError, SyntaxError, ValueError) as e:  # Pillow: UnidentifiedImageError, "Truncated File Read", ...
            raise cli.UserError(f"{p} cannot be read as an image ({type(e).__name__}: {str(e)[:120]}): {fix}") from None
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# FID (torch-fidelity)
# ---------------------------------------------------------------------------------------------

# the SHA-256 of torch-fidelity's published file; its first 8 digits are the 6726825d in the
# file's name (torch.hub's convention for checking a download)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def load_inception(path, allow_other=False):
    """torch-fidelity's Inception-v3 ("inception-v3-compat", the TF graph's weights) from a file,
    on device().

    The file is read as tensors only (torch.load(weights_only=True): a file that would run code
    when unpickled is refused, not run) and handed to torch-fidelity re-saved from those tensors,
    as its own loader unpickles whatever it is given. A file that is not the published one
    (another SHA-256) is refused, or with allow_other (evaluate.py --other-inception) loaded with
    a warning that its FID is not comparable with published ones."""
    if not path or not os.path.exists(path):
        raise missing("inception", path or "--inception")
    import tempfile  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3  # noqa: PLC0415
    digest = sha256_file(path)
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError("not a state dict of tensors")
    except Exception as e:  # pickles that are not plain tensors, random bytes: torch raises many kinds
        raise cli.UserError(f"{path} is not the Inception-v3 weights file (not a state dict of tensors: "
                            f"{type(e).__name__}); nothing in it was run. Get the published file once, on a "
                            f"machine with network:\n  {DOWNLOADS['inception']}") from None
    if digest != INCEPTION_SHA256 and not allow_other:
        raise cli.UserError(f"{path} is not torch-fidelity's published Inception-v3 file (SHA-256 {digest[:16]}..., "
                            f"not {INCEPTION_SHA256[:16]}...): its FID would not be comparable with published "
                            f"ones. Get the published file:\n  {DOWNLOADS['inception']}\nor give --other-inception "
                            "to use this one anyway")
    if digest != INCEPTION_SHA256:
        print(f"warning: {path} is not torch-fidelity's published Inception-v3 file (SHA-256 {digest[:16]}...): "
              "its FID is not comparable with published FIDs", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        safe = os.path.join(tmp, "inception.pth")
        torch.save(weights, safe)
        try:
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=safe)
        except RuntimeError as e:  # load_state_dict: missing or mis-shaped tensors
            raise cli.UserError(f"{path} holds tensors, but not Inception-v3's ({str(e).splitlines()[0][:120]}): "
                                f"get the published file:\n  {DOWNLOADS['inception']}") from None
    net.sha256 = digest
    return net.to(device())


def inception_features(extractor, images_uint8, batch=64, desc=None):
    """uint8 (N, H, W, 3) -> float32 (N, 2048) torch features of the pool layer (on the CPU)."""
    import torch  # noqa: PLC0415
    dev = next(extractor.parameters()).device
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(images_uint8), batch), desc=desc, unit="batch", disable=desc is None):
            x = torch.from_numpy(np.ascontiguousarray(images_uint8[i:i + batch].transpose(0, 3, 1, 2)))
            out.append(extractor(x.to(dev))[0].cpu())
    return torch.cat(out)


def fid_statistics(features):
    """Mean and covariance (unbiased, torch-fidelity's) of (N, D) features."""
    from torch_fidelity.metric_fid import fid_features_to_statistics  # noqa: PLC0415
    return fid_features_to_statistics(features)


def fid(stats_a, stats_b) -> float:
    """The Frechet distance |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2) (torch-fidelity's)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric  # noqa: PLC0415
    return float(fid_statistics_to_metric(stats_a, stats_b, False)[KEY_METRIC_FID])


def reference_statistics(extractor, paths, side, cache_dir, fix=REREAD["coco"]):
    """FID statistics of the reference images, computed once and kept in cache_dir for every later
    run. The key is everything that decides them: the image set (names and sizes), the side, the
    pipeline, the Inception file's SHA-256 and the versions of torch, torch-fidelity and Pillow.
    Each .npz has its SHA-256 in a .json beside it; a file that no longer matches is computed
    again, with a warning. An image that cannot be read stops the run with its path and `fix`
    (read_images): skipping it would change the reference set."""
    v = versions()
    record = {"images_sha256": hashlib.sha256(json.dumps([[os.path.basename(p), os.path.getsize(p)]
                                                          for p in paths]).encode()).hexdigest(),
              "num_images": len(paths), "side": side, "pipeline": PIPELINE, "inception_sha256": extractor.sha256,
              "versions": {k: v[k] for k in ("torch", "torch-fidelity", "pillow")}}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"fid_reference_{key}.npz")
    if os.path.exists(path) and os.path.exists(path[:-4] + ".json"):
        with open(path[:-4] + ".json") as f:
            want = json.load(f).get("npz_sha256")
        if sha256_file(path) == want:
            z = np.load(path)
            return {"mu": z["mu"], "sigma": z["sigma"], "key": key}
        print(f"warning: {path} does not match its recorded SHA-256 (damaged?): computing it again", file=sys.stderr)
    feats = [inception_features(extractor, read_images(paths[i:i + 256], side, fix))
             for i in tqdm(range(0, len(paths), 256), desc="reference images", unit="batch")]
    import torch  # noqa: PLC0415
    stats = fid_statistics(torch.cat(feats))
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        np.savez(f, **stats)
    os.replace(path + ".tmp", path)
    with open(path[:-4] + ".json", "w") as f:
        json.dump(record | {"npz_sha256": sha256_file(path)}, f, indent=1)
    return stats | {"key": key}


# ---------------------------------------------------------------------------------------------
# CLIP score (transformers)
# ---------------------------------------------------------------------------------------------

# paper: not specified beyond "CLIP score" (§3, citing CLIPScore and CLIP). Two conventions:
CLIP_CONVENTIONS = {
    # GLIDE's and torchmetrics' CLIPScore: 100 x cos per pair; the set's mean clamped at 0
    "100cos": {"prefix": "", "scale": 100.0, "clamp": "mean"},
    # Hessel et al. 2021's CLIPScore: 2.5 x max(cos, 0) per pair, the caption prefixed "A photo
    # depicts" (the paper's reference; Hessel et al. use ViT-B/32)
    "hessel": {"prefix": "A photo depicts ", "scale": 2.5, "clamp": "pair"},
}


def load_clip(path):
    """transformers' CLIP model and processor from a local directory, on device(). A folder that
    is not a CLIP model (its config.json names another model type, or none) or whose files
    cannot be read (cut short, missing) is refused with its path and the line that gets CLIP."""
    if not path or not os.path.isdir(path):
        raise missing("clip", path or "--clip")
    get = f"on a machine with network:\n  {DOWNLOADS['clip']}"
    try:
        with open(os.path.join(path, "config.json")) as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:  # no config.json, not JSON, not an object
        what = "no config.json" if isinstance(e, FileNotFoundError) else f"config.json: {type(e).__name__}"
        raise cli.UserError(f"{path} is not a CLIP model folder ({what}): get CLIP once, {get}") from None
    if kind != "clip":  # transformers would load another model's folder as a CLIP of random weights
        raise cli.UserError(f"{path} holds a {kind!r} model, not CLIP (its config.json): give --clip a CLIP "
                            f"folder; get one once, {get}")
    from safetensors import SafetensorError  # noqa: PLC0415
    from transformers import CLIPModel, CLIPProcessor  # noqa: PLC0415
    try:
        model, processor = CLIPModel.from_pretrained(path), CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:  # cut short, missing, mis-shaped
        first = (str(e).splitlines() or [""])[0].split(". ")[0][:160]
        raise cli.UserError(f"{path} is not a whole CLIP model ({type(e).__name__}: {first}): download it "
                            f"again, {get}") from None
    return model.eval().to(device()), processor


def clip_files_sha256(path):
    """The SHA-256 of each weights file of a CLIP directory (metrics.json records them)."""
    return {f: sha256_file(os.path.join(path, f)) for f in sorted(os.listdir(path))
            if f.endswith((".safetensors", ".bin"))}


def clip_scores(clip, images_uint8, captions, convention="100cos", batch=32, desc=None) -> np.ndarray:
    """Per pair: scale x cos(E_image, E_text) of CLIP's projected embeddings, with the
    convention's caption prefix; clamped at 0 here for "hessel", after the mean (clip_score) for
    "100cos"."""
    import torch  # noqa: PLC0415
    model, processor = clip
    conv = CLIP_CONVENTIONS[convention]
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(captions), batch), desc=desc, unit="batch", disable=desc is None):
            inputs = processor(text=[conv["prefix"] + c for c in captions[i:i + batch]],
                               images=list(images_uint8[i:i + batch]), return_tensors="pt", padding=True,
                               truncation=True)
            o = model(**inputs.to(dev))  # the projected embeddings (transformers' CLIPModel.forward)
            cos = torch.nn.functional.cosine_similarity(o.image_embeds, o.text_embeds, dim=-1)
            out.append((conv["scale"] * (cos.clamp(min=0) if conv["clamp"] == "pair" else cos)).cpu().numpy())
    return np.concatenate(out)


def clip_score(per_pair, convention="100cos") -> float:
    """The CLIP score of a set: the mean of the per-pair scores, for "100cos" clamped at 0 after
    the mean (torchmetrics' CLIPScore: max(mean, 0))."""
    mean = float(np.mean(per_pair))
    return max(mean, 0.0) if CLIP_CONVENTIONS[convention]["clamp"] == "mean" else mean
