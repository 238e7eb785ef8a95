"""Fetch model checkpoints when missing.

`python weights.py` fetches what the current settings need (GROUNDINGDINO_CHECKPOINT and the
SAM or MobileSAM checkpoint); `python weights.py --dir /models NAME...` fetches the named files of
MANIFEST (and `bert-base-uncased`, the text encoder, saved as a local directory) for a Docker image.
Only names in MANIFEST can be fetched; a missing file elsewhere is an error naming the variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import urllib.request

from config import Settings

logger = logging.getLogger("weights")

MANIFEST = {
    "groundingdino_swint_ogc.pth":
        "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha/groundingdino_swint_ogc.pth",
    "groundingdino_swinb_cogcoor.pth":
        "https://github.com/IDEA-Research/GroundingDINO/releases/download/v0.1.0-alpha2/groundingdino_swinb_cogcoor.pth",
    "sam_vit_h_4b8939.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    "sam_vit_l_0b3195.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "sam_vit_b_01ec64.pth": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "mobile_sam.pt": "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
}


class DownloadError(RuntimeError):
    pass


def required_files(settings: Settings) -> list[tuple[str, str]]:
    """(variable, path) of every checkpoint the settings need."""
    files = [("GROUNDINGDINO_CHECKPOINT", settings.groundingdino_checkpoint)]
    if settings.segmenter == "sam":
        files.append(("SAM_CHECKPOINT", settings.sam_checkpoint))
    elif settings.segmenter == "mobile_sam":
        files.append(("MOBILESAM_CHECKPOINT", settings.mobilesam_checkpoint))
    return files


def download(url: str, path: str, timeout: float = 60) -> None:
    """Fetch url to path through a .part file, so an interrupted download never looks complete."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    part = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                if total:
                    print(f"\r{os.path.basename(path)}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB",
                          end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        os.replace(part, path)
    except OSError as e:
        raise DownloadError(f"could not download {os.path.basename(path)} from {url}: {e}") from e


def ensure(settings: Settings) -> None:
    for variable, path in required_files(settings):
        if os.path.isfile(path):
            continue
        url = MANIFEST.get(os.path.basename(path))
        if url is None:
            raise DownloadError(f"{variable}={path}: file not found, and no download is known for that name")
        logger.info("%s missing: downloading %s", path, url)
        try:
            download(url, path)
        except DownloadError as e:
            raise DownloadError(f"{e}. Download it yourself to {path}, or set {variable} to a local copy") from e


def save_text_encoder(name: str, directory: str) -> None:
    """Save a hub text encoder (e.g. bert-base-uncased) as a local directory usable offline."""
    from transformers import AutoTokenizer, BertModel

    target = os.path.join(directory, name)
    if os.path.isfile(os.path.join(target, "config.json")):
        return
    AutoTokenizer.from_pretrained(name).save_pretrained(target)
    BertModel.from_pretrained(name).save_pretrained(target)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"files to fetch: {', '.join(MANIFEST)}, bert-base-uncased")
    parser.add_argument("--dir", default=None, help="where named files go (default: MODEL_DIR)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if not args.names:
        ensure(settings)
        return
    directory = args.dir or settings.model_dir
    for name in args.names:
        if name == "bert-base-uncased":
            save_text_encoder(name, directory)
        elif name in MANIFEST:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                download(MANIFEST[name], path)
        else:
            raise DownloadError(f"unknown file {name!r}; known: {', '.join(MANIFEST)}, bert-base-uncased")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        main()
    except DownloadError as e:
        sys.exit(f"error: {e}")
