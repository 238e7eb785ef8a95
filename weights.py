"""Fetch model checkpoints at pinned revisions and verify their SHA-256 digests.

    python weights.py                        fetch what the current settings need (`make serve` runs this)
    python weights.py --dir /models NAME...  fetch the named manifest entries into a directory (the Docker build)
    python weights.py --list                 show the manifest

The libraries made for it do the fetching: a file on the Hugging Face hub comes through `huggingface_hub`
(`hf_hub_download` at a pinned revision: HF_TOKEN for gated repositories, HF_ENDPOINT for a mirror, HF_HUB_OFFLINE,
its cache, resuming an interrupted download from where it stopped, in this run or the next), a file on a plain host
through `pooch` (a known SHA-256 digest, retries, a progress bar; an interrupted download starts again). Only a
file whose size and SHA-256 match the manifest is kept; a downloaded file that does not match is deleted and the
run fails. A file already in place is checked too (once: a small `.weights-verified.json` next to it remembers the
result by size and modification time, so a verified file needs no network again), and one that does not match is
an error, never silently replaced. The manifest is weights.json; `--manifest FILE` (JSON, the same layout) swaps the
whole manifest, e.g. for an internal mirror.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger("weights")

# The built-in manifest (the layout validate_manifest describes). Every digest in it was read in published sources,
# never computed from a download here (no weight file can be downloaded from this project's machines); each entry's
# "source" says where. A hub file without a digest (sam3.pt: none is published outside its gated repository) is
# verified against the hub's own LFS digest of the file at the pinned revision.
MANIFEST_FILE = Path(__file__).with_name("weights.json")
STAMP = ".weights-verified.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DownloadError(RuntimeError):
    """A file could not be fetched or is not the file the manifest names; the message says which and why."""


class ChecksumError(DownloadError):
    """A file's size or SHA-256 digest differs from the manifest's."""


class GatedError(DownloadError):
    """A file of a gated hub repository: no token, a token the hub refuses, or a license not accepted. The
    message is one line saying what to do."""


# ---------------------------------------------------------------------------------------------- manifest

def validate_manifest(manifest: Mapping) -> dict:
    """Check a manifest's layout; return it as a dict. Raises DownloadError naming the bad entry.

    Each entry: {"description": str, "source": where its digests were read, "files": [spec, ...]}; each spec:
    "path" (relative to the target directory), "hub" ({"repo", "revision", "file"}: fetched with hf_hub_download)
    and/or "urls" (plain hosts, tried after the hub), "size" (bytes or null), "sha256" (64 hex digits; null: the
    hub's LFS digest for a hub file, else not verified) and, for a gated hub repository, "gated" (the https page
    where its license is accepted)."""
    if not isinstance(manifest, Mapping) or not manifest:
        raise DownloadError("manifest: expected a non-empty object of entries")
    for name, entry in manifest.items():
        files = entry.get("files") if isinstance(entry, Mapping) else None
        if not isinstance(files, list) or not files:
            raise DownloadError(f"manifest entry {name!r}: 'files' must be a non-empty list")
        for spec in files:
            where = f"manifest entry {name!r}, file {spec.get('path') if isinstance(spec, Mapping) else spec!r}"
            if not isinstance(spec, Mapping):
                raise DownloadError(f"{where}: expected an object")
            path = spec.get("path")
            if not isinstance(path, str) or not path or Path(path).is_absolute() or ".." in Path(path).parts:
                raise DownloadError(f"{where}: 'path' must be a relative path inside the target directory")
            hub, urls = spec.get("hub"), spec.get("urls", [])
            if hub is not None and not (isinstance(hub, Mapping) and
                                        all(isinstance(hub.get(k), str) and hub[k] for k in ("repo", "revision",
                                                                                             "file"))):
                raise DownloadError(f"{where}: 'hub' must be an object with 'repo', 'revision' and 'file'")
            if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls) or not (hub or urls):
                raise DownloadError(f"{where}: needs 'hub' or 'urls' (a non-empty list of URLs)")
            digest = spec.get("sha256")
            if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
                raise DownloadError(f"{where}: 'sha256' must be 64 lowercase hex digits or null")
            size = spec.get("size")
            if size is not None and not (isinstance(size, int) and size >= 0):
                raise DownloadError(f"{where}: 'size' must be a byte count or null")
            gated = spec.get("gated")
            if gated is not None and not (hub and isinstance(gated, str) and gated.startswith("https://")):
                raise DownloadError(f"{where}: 'gated' must be the https URL of the page where the license of its "
                                    "'hub' repository is accepted")
    return dict(manifest)


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    """The JSON manifest at `path` (default: weights.json), checked."""
    path = MANIFEST_FILE if path is None else path
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DownloadError(f"manifest {path}: {e}") from e
    return validate_manifest(data)


# ---------------------------------------------------------------------------------------------- checking

def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_stamps(directory: Path) -> dict:
    try:
        data = json.loads((directory / STAMP).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamp(path: Path, digest: str) -> None:
    """Remember that `path` (as it is now) has `digest`; silently skipped on a read-only directory."""
    stat = path.stat()
    stamps = _read_stamps(path.parent)
    stamps[path.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    tmp = path.parent / f"{STAMP}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path.parent / STAMP)
    except OSError:
        tmp.unlink(missing_ok=True)


def _stamped(path: Path, digest: str | None = None) -> str | None:
    """The digest a stamp remembers for `path` as it is now (and equal to `digest` when given), else None."""
    stamp = _read_stamps(path.parent).get(path.name)
    stat = path.stat()
    if not isinstance(stamp, dict) or stamp.get("size") != stat.st_size or stamp.get("mtime_ns") != stat.st_mtime_ns:
        return None
    return stamp.get("sha256") if digest in (None, stamp.get("sha256")) else None


def check_file(path: Path, spec: Mapping) -> str | None:
    """None when `path` matches the spec's size and digest (and remembers that), else the reason it does not."""
    size, expected = spec.get("size"), spec.get("sha256")
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size {actual_size} bytes, expected {size}"
    if expected is None or _stamped(path, expected):
        return None
    digest = sha256_of(path)
    if digest != expected:
        return f"sha256 {digest}, expected {expected}"
    _write_stamp(path, digest)
    return None


# ---------------------------------------------------------------------------------------------- the hub

def hub_token() -> str | None:
    """The user's Hugging Face token, as huggingface_hub finds it: HF_TOKEN, else the file `hf auth login`
    writes. None when there is none."""
    from huggingface_hub import get_token

    return get_token() or None


def gated_message(where: str, page: str, code: int | None) -> str:
    """One line: why a gated file can't be fetched (code: the hub's HTTP status; None: no token) and what to do."""
    if code is None:
        return (f"{where}: {page} is gated: accept its license there with your Hugging Face account, then set "
                "HF_TOKEN to a read token of that account (https://huggingface.co/settings/tokens) and run this again")
    if code == 401:
        return (f"{where}: the hub did not accept the token (HTTP 401): set HF_TOKEN to a valid read token "
                "(https://huggingface.co/settings/tokens)")
    return (f"{where}: HTTP {code}: the token's account has no access to {page} (yet): accept the license there "
            "(Meta approves requests, which can take a while), then run this again")


def _http_status(error: BaseException | None) -> int | None:
    """The HTTP status behind a huggingface_hub or requests error (it may be the cause of the one raised)."""
    while error is not None:
        response = getattr(error, "response", None)
        if response is not None:
            return response.status_code
        error = error.__cause__
    return None


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub call raises when the file can't be had: HTTP errors, no network, offline mode, a bad answer."""
    import requests
    from huggingface_hub.errors import FileMetadataError, LocalEntryNotFoundError

    return requests.RequestException, LocalEntryNotFoundError, FileMetadataError, OSError, ValueError


def _hub_error(error: BaseException, spec: Mapping, where: str) -> DownloadError:
    code, page = _http_status(error), spec.get("gated")
    if page and code in (401, 403):
        return GatedError(gated_message(where, page, code))
    hub = spec["hub"]
    return DownloadError(f"hub {hub['repo']}@{hub['revision'][:12]} {hub['file']}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hub_digest(spec: Mapping, token: str | None, where: str) -> tuple[str, int]:
    """(sha256, size) of a hub file from the hub itself: its LFS object id and size at the pinned revision
    (`get_hf_file_metadata`). Raises GatedError on 401/403 of a gated file, DownloadError otherwise."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    hub = spec["hub"]
    try:
        meta = get_hf_file_metadata(hf_hub_url(hub["repo"], hub["file"], revision=hub["revision"]),
                                    token=token or False)
    except _hub_errors() as e:
        raise _hub_error(e, spec, where) from e
    if not _SHA256.fullmatch(meta.etag or "") or meta.size is None:
        raise DownloadError(f"hub {hub['repo']} {hub['file']}: the hub answered no LFS digest (etag "
                            f"{meta.etag!r}), so the file can't be verified")
    return meta.etag, meta.size


def _from_hub(spec: Mapping, path: Path, token: str | None, attempts: int) -> None:
    """hf_hub_download into `path`'s directory (its .cache/huggingface keeps an interrupted download, which the next
    attempt, in this run or another, resumes), then moved to `path` when the repository keeps it in a folder."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = spec["hub"]
    for attempt in range(attempts):
        try:
            got = hf_hub_download(hub["repo"], hub["file"], revision=hub["revision"], local_dir=path.parent,
                                  token=token or False)
            break
        except _hub_errors() as e:
            # The hub unreachable (huggingface_hub tried 5 times already, over 23 s) or a 4xx: not again.
            if attempt == attempts - 1 or isinstance(e, LocalEntryNotFoundError) or 400 <= (_http_status(e) or 0) < 500:
                raise
            logger.warning("%s: attempt %d of %d stopped (%s); resuming", path.name, attempt + 1, attempts,
                           _first_line(e))
    if Path(got) != path:
        os.replace(got, path)


def _from_url(url: str, path: Path, digest: str | None, attempts: int, progress: bool) -> None:
    """pooch: download `url` to a temporary file beside `path`, check its digest, move it into place; a dropped
    connection or a corrupted download is tried again from the start, `attempts` times in all. Raises
    ValueError (the digest differs every time) or requests' errors."""
    import pooch

    fetcher = pooch.create(path=path.parent, base_url="", retry_if_failed=attempts - 1,
                           registry={path.name: f"sha256:{digest}" if digest else None}, urls={path.name: url})
    fetcher.fetch(path.name, progressbar=progress)


# ---------------------------------------------------------------------------------------------- fetching

def _present(path: Path, spec: Mapping, where: str, token: str | None) -> Path:
    """A file already in place: verified (once), or ChecksumError; never replaced."""
    if spec.get("sha256") is None and spec.get("hub"):
        if _stamped(path):
            logger.info("%s: present, verified against the hub's digest before", path)  # no hub needed: offline
            return path
        if spec.get("gated") and token is None:
            logger.warning("%s: present, NOT VERIFIED (its digest is asked of the hub, which needs HF_TOKEN)", path)
            return path
        digest, size = hub_digest(spec, token, where)
        spec = {**spec, "sha256": digest, "size": size}
    problem = check_file(path, spec)
    if problem is not None:
        raise ChecksumError(
            f"{where}: {problem}: this is not the published {path.name}. It was not downloaded by this run, so "
            f"it is left in place: delete it to download it again, or give your own checkpoint another file name "
            f"(and point the variable at it)")
    logger.info("%s: present and valid", path)
    return path


def fetch_file(spec: Mapping, directory: str | os.PathLike, *, variable: str | None = None, progress: bool = True,
               attempts: int = 3) -> Path:
    """Make `directory/spec["path"]` the file the spec names: keep it when it is there and valid, else fetch it
    (the hub first, then each plain URL), verify it and leave it in place. Returns its path. Raises DownloadError
    (GatedError, ChecksumError)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    path = Path(directory) / spec["path"]
    where = f"{variable}={path}" if variable else str(path)
    token = hub_token() if spec.get("hub") else None
    if path.is_file():
        return _present(path, spec, where, token)
    if spec.get("gated") and token is None:
        raise GatedError(gated_message(where, spec["gated"], None))
    path.parent.mkdir(parents=True, exist_ok=True)
    (enable_progress_bars if progress else disable_progress_bars)()
    errors, source = [], None
    if spec.get("hub"):
        try:
            if spec.get("sha256") is None:
                digest, size = hub_digest(spec, token, where)
                spec = {**spec, "sha256": digest, "size": size}
            _from_hub(spec, path, token, attempts)
            source = f"the hub ({spec['hub']['repo']})"
        except (DownloadError, *_hub_errors()) as e:
            error = e if isinstance(e, DownloadError) else _hub_error(e, spec, where)
            if isinstance(error, GatedError) or spec.get("sha256") is None:  # no plain host's copy can be verified
                raise error from None
            errors.append(str(error))
    for url in spec.get("urls", []) if source is None else []:
        try:
            _from_url(url, path, spec.get("sha256"), attempts, progress)
        except ValueError:  # pooch: the digest differed, every attempt; it deleted each download
            raise ChecksumError(f"{where}: the file downloaded from {url} is not the published one (its sha256 is "
                                f"not {spec['sha256']}, in {attempts} attempts); it was deleted. Try again later, or "
                                "fetch it yourself and check its digest") from None
        except _hub_errors() as e:  # requests' errors, a disk error
            errors.append(f"{url}: {e}")
            continue
        source = url
        break
    if source is None:
        hint = f", or set {variable} to a copy you have" if variable else ""
        error = DownloadError(f"{where}: could not download it ({'; '.join(errors)}). Download it yourself to "
                              f"{path} (sha256 {spec.get('sha256') or 'unknown'}){hint}")
        error.cause = "; ".join(errors)
        raise error
    problem = check_file(path, spec)
    if problem is not None:
        path.unlink()
        raise ChecksumError(f"{where}: the file downloaded from {source} has {problem}; it was deleted. The download "
                            "was corrupted or the server sent another file: try again, or fetch it yourself and "
                            "check its digest")
    if spec.get("sha256") is None:
        logger.warning("%s: NOT VERIFIED (the manifest has no digest for it); its sha256 is %s", path,
                       sha256_of(path))
    logger.info("%s: downloaded from %s and verified", path, source)
    return path


def fetch_entry(name: str, directory: str | os.PathLike, manifest: Mapping | None = None, *,
                variable: str | None = None, **options) -> list[Path]:
    """Fetch every file of a manifest entry into `directory`; return their paths."""
    manifest = load_manifest() if manifest is None else manifest
    if name not in manifest:
        raise DownloadError(f"unknown name {name!r}; known: {', '.join(manifest)}")
    return [fetch_file(spec, directory, variable=variable, **options) for spec in manifest[name]["files"]]


# ---------------------------------------------------------------------------------------------- settings

def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or os.path.isdir(value)


def _size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def ensure(settings=None, manifest: Mapping | None = None, **options) -> list[Path]:
    """Fetch what `settings` (default: from the environment) need: the files of `Settings.checkpoints()`
    (Grounding DINO's or SAM 3's, and the segmenter's) and, for Grounding DINO, the text encoder when
    GROUNDINGDINO_TEXT_ENCODER is a directory.

    A needed file whose name is in the manifest is verified or downloaded to the configured path; one with
    another name must exist (your own checkpoint: nothing to fetch or verify). Every file is tried; when any is
    missing or wrong, one DownloadError lists them all, with their sizes and digests and what to do offline."""
    if settings is None:
        from config import Settings

        settings = Settings.from_env()
    manifest = load_manifest() if manifest is None else manifest
    single = {e["files"][0]["path"]: name for name, e in manifest.items() if len(e["files"]) == 1}
    # (variable, directory, file spec or None for a file of your own, path)
    wanted: list[tuple[str, str, Mapping | None, str]] = []
    for checkpoint in settings.checkpoints():
        name = single.get(os.path.basename(checkpoint.path))
        directory = os.path.dirname(checkpoint.path) or "."
        spec = manifest[name]["files"][0] if name else None
        wanted.append((checkpoint.variable, directory, spec, checkpoint.path))
    encoder = settings.groundingdino_text_encoder
    encoder_entry = None
    if settings.engine == "sam3":
        pass  # no Grounding DINO, so no text encoder
    elif _looks_like_path(encoder):
        name = os.path.basename(os.path.normpath(encoder))
        if name in manifest and len(manifest[name]["files"]) > 1:
            encoder_entry = manifest[name]
            parent = os.path.dirname(os.path.normpath(encoder)) or "."
            wanted += [("GROUNDINGDINO_TEXT_ENCODER", parent, spec, os.path.join(parent, spec["path"]))
                       for spec in encoder_entry["files"]]
        elif not os.path.isfile(os.path.join(encoder, "config.json")):
            raise DownloadError(f"GROUNDINGDINO_TEXT_ENCODER={encoder}: no config.json there, and no download is "
                                "known for that directory name")
    else:
        logger.info("GROUNDINGDINO_TEXT_ENCODER=%s is a hub id: transformers fetches it into its cache when the "
                    "models load. For offline use: python weights.py --dir %s bert-base-uncased, then "
                    "GROUNDINGDINO_TEXT_ENCODER=%s", encoder, settings.model_dir,
                    os.path.join(settings.model_dir, "bert-base-uncased"))

    done, problems = [], []  # problems: (variable, path, spec or None, reason)
    for variable, directory, spec, path in wanted:
        if spec is None:
            if os.path.isfile(path):
                logger.info("%s=%s: your own file, not verified", variable, path)
            else:
                problems.append((variable, path, None, f"{variable}={path}: file not found, and no download is "
                                 f"known for that name (known: {', '.join(single)})"))
            continue
        try:
            done.append(fetch_file(spec, directory, variable=variable, **options))
        except DownloadError as e:
            problems.append((variable, path, spec, f"not downloaded: {e.cause}" if hasattr(e, "cause") else str(e)))
    if problems:
        raise DownloadError(_missing_report(problems, encoder if encoder_entry else None, encoder_entry))
    return done


def _missing_report(problems: list, encoder: str | None, encoder_entry: Mapping | None) -> str:
    """One message for every file that is missing or wrong: what, where, how big, its digest, and what to do."""
    total = sum((spec or {}).get("size") or 0 for _, _, spec, _ in problems)
    lines = [f"{len(problems)} model file(s) the settings need are missing or not the published ones "
             f"({_size(total)} in all):"]
    for variable, path, spec, reason in problems:
        if spec is None:
            lines.append(f"  - {reason}")
            continue
        lines.append(f"  - {path} ({variable}; {_size(spec.get('size'))}, sha256 {spec.get('sha256') or 'unknown'})")
        lines.append(f"      {reason}")
    if encoder and any(variable == "GROUNDINGDINO_TEXT_ENCODER" for variable, *_ in problems):
        files = ", ".join(os.path.basename(spec["path"]) for spec in encoder_entry["files"])
        lines.append(f"  GROUNDINGDINO_TEXT_ENCODER={encoder} is a directory that must hold: {files}.")
    lines.append("To fetch them: `python weights.py` (or `make weights`) where the download hosts are reachable; "
                 "`python weights.py --list` shows each file's size and digest, and its source URLs are in "
                 "weights.json. Offline: copy each file to the path above (it is checked against its "
                 "sha256), or point the variable at a copy you have.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command line

def _describe(manifest: Mapping) -> str:
    lines = []
    for name, entry in manifest.items():
        sizes = [f.get("size") for f in entry["files"]]
        size = "       ? MiB" if None in sizes else f"{sum(sizes) / 2**20:8.0f} MiB"  # the hub says, when asked
        verified = all(f.get("sha256") for f in entry["files"])
        hub = all(f.get("sha256") or f.get("hub") for f in entry["files"])
        check = "sha256" if verified else "hub LFS" if hub else "NOT VERIFIED"
        lines.append(f"{name:34} {size}  {check:12}  {entry.get('description', '')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("names", nargs="*", help="manifest entries to fetch (see --list); none: what the settings "
                                                 "need")
    parser.add_argument("--dir", help="where named entries go (default: MODEL_DIR)")
    parser.add_argument("--manifest", help="a JSON manifest to use instead of the built-in one")
    parser.add_argument("--list", action="store_true", help="show the manifest and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = load_manifest(args.manifest)
        if args.list:
            print(_describe(manifest))
            return 0
        options = {"progress": not args.quiet}
        if not args.names:
            ensure(manifest=manifest, **options)
            return 0
        if args.dir:
            directory = args.dir
        else:
            from config import Settings

            directory = Settings.from_env().model_dir
        unknown = [n for n in args.names if n not in manifest]
        if unknown:
            raise DownloadError(f"unknown name(s) {', '.join(unknown)}; known: {', '.join(manifest)}")
        for name in dict.fromkeys(args.names):
            fetch_entry(name, directory, manifest, **options)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
