"""Fetch the model checkpoints the current settings need, when missing: `python weights.py`.

Only files whose name is in MANIFEST can be fetched; a missing file elsewhere is an error
that names the variable to fix.
"""

from __future__ import annotations

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


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        ensure(Settings.from_env())
    except DownloadError as e:
        sys.exit(f"error: {e}")
