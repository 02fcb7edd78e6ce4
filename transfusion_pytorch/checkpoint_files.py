"""Crash-safe checkpoint files: atomic writes, JSON manifests and content-hashed payloads.

Every file is written to a temporary file in the same directory, fsynced and moved into place
with os.replace (atomic). Payloads are named by content hash and written before the manifest that
names them, so replacing the manifest is the single commit point: after a crash at any moment the
directory holds the previous checkpoint or the new one, whole; the next save removes leftovers.
Loading checks each payload's sha256 and reads it with torch.load(weights_only=True): tensors
and plain containers only, no code. One writer per directory at a time. What goes into a
manifest and a payload is checkpoint.py's business.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from torch.serialization import MAP_LOCATION

from .version import __version__

FORMAT_VERSION = 1
PRETRAINED_MANIFEST = 'config.json'
TRAINING_MANIFEST = 'training_state.json'
_FORMATS = {PRETRAINED_MANIFEST: 'transfusion_pytorch.pretrained', TRAINING_MANIFEST: 'transfusion_pytorch.training_state'}
_PAYLOAD_NAME = re.compile(r'(weights|state)-[0-9a-f]{16}\.pt')
_TEMP_PREFIX = '.tmp-transfusion-'


# atomic files

def _fsync_directory(directory: Path) -> None:
    """Make a rename durable (POSIX); Windows cannot open a directory, nor needs to."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit_file(directory: Path, write: Callable[[BinaryIO], str]) -> str:
    """`write` fills a temporary file in `directory` and returns the final name; the file is
    fsynced and renamed into place, so a reader sees the old file or the new one, never a part."""
    fd, temp = tempfile.mkstemp(prefix = _TEMP_PREFIX, dir = directory)
    try:
        with os.fdopen(fd, 'wb') as file:
            name = write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, 0o644)                     # mkstemp makes it owner-only
        os.replace(temp, directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_directory(directory)
    return name


class _HashingWriter:
    """A write-only file that hashes what passes through, so a payload is hashed as it is saved."""

    def __init__(self, file: BinaryIO):
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _write_payload(directory: Path, kind: str, payload: dict) -> dict:
    digest = {}

    def write(file: BinaryIO) -> str:
        writer = _HashingWriter(file)
        torch.save(payload, writer)
        digest['sha256'] = writer.sha256.hexdigest()
        return f'{kind}-{digest["sha256"][:16]}.pt'

    name = _commit_file(directory, write)
    return {'name': name, 'sha256': digest['sha256']}


def save_checkpoint(directory: str | os.PathLike, manifest_name: str, manifest: dict, kind: str, payload: dict) -> None:
    """Payload first, then the manifest (the commit point), then cleanup."""
    directory = Path(directory)
    if not directory.is_dir():
        directory.mkdir(parents = True)
        _fsync_directory(directory.parent)
    manifest = {'format': _FORMATS[manifest_name], 'format_version': FORMAT_VERSION,
                'library_version': __version__, **manifest, 'payload': _write_payload(directory, kind, payload)}

    def write_manifest(file: BinaryIO) -> str:
        file.write(json.dumps(manifest, indent = 2).encode())
        return manifest_name

    _commit_file(directory, write_manifest)
    _prune(directory)


def _prune(directory: Path) -> None:
    """Remove temporaries of interrupted saves and payloads no manifest names. If a manifest
    cannot be read, keep everything: better a stale file than a deleted checkpoint."""
    referenced = set()
    for manifest_name in _FORMATS:
        path = directory / manifest_name
        if path.exists():
            try:
                referenced.add(json.loads(path.read_text())['payload']['name'])
            except (ValueError, KeyError, TypeError, OSError):
                return
    for path in directory.iterdir():
        stale = path.name.startswith(_TEMP_PREFIX) or (_PAYLOAD_NAME.fullmatch(path.name) and path.name not in referenced)
        if stale:
            with contextlib.suppress(OSError):
                path.unlink()


# reading

def read_manifest(directory: str | os.PathLike, manifest_name: str) -> dict:
    path = Path(directory) / manifest_name
    if not path.is_file():
        raise FileNotFoundError(f'no checkpoint at {directory}: {manifest_name} is missing')
    try:
        manifest = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f'{path} is not valid JSON: {error}') from error
    if not isinstance(manifest, dict) or manifest.get('format') != _FORMATS[manifest_name]:
        raise ValueError(f'{path} is not a {_FORMATS[manifest_name]} manifest')
    version = manifest.get('format_version')
    if not isinstance(version, int) or version < 1:
        raise ValueError(f'{path} has no valid format_version (got {version!r})')
    if version > FORMAT_VERSION:
        raise ValueError(f'{path} has checkpoint format version {version}, written by a newer transfusion_pytorch '
                         f'({manifest.get("library_version")}); this one ({__version__}) reads versions up to {FORMAT_VERSION}: upgrade it')
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    """The fields loading relies on, with their types (a hand-edited or foreign file must fail
    here, before anything is loaded, not halfway with a bare KeyError)."""
    payload = manifest.get('payload')
    if not isinstance(payload, dict) or not all(isinstance(payload.get(k), str) for k in ('name', 'sha256')):
        raise ValueError(f'{path}: "payload" must be an object with string "name" and "sha256", got {payload!r}')
    if manifest['format'] == _FORMATS[TRAINING_MANIFEST]:
        step = manifest.get('step')
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f'{path}: "step" must be a non-negative integer, got {step!r}')
    for key in ('modality_encoders', 'modality_decoders'):
        flags = manifest.get(key, [])
        if not isinstance(flags, list) or not all(isinstance(flag, bool) for flag in flags):
            raise ValueError(f'{path}: "{key}" must be a list of booleans, got {flags!r}')
    for key in ('optimizer_class', 'scheduler_class'):
        if not isinstance(manifest.get(key, ''), (str, type(None))):
            raise ValueError(f'{path}: "{key}" must be a string, got {manifest[key]!r}')


def _file_sha256(path: Path) -> str:
    sha256 = hashlib.sha256()
    with open(path, 'rb') as file:
        for chunk in iter(lambda: file.read(1 << 20), b''):
            sha256.update(chunk)
    return sha256.hexdigest()


def read_payload(directory: str | os.PathLike, manifest: dict, map_location: MAP_LOCATION) -> dict:
    entry = manifest.get('payload') or {}
    name = entry.get('name', '')
    if not isinstance(name, str) or not _PAYLOAD_NAME.fullmatch(name):      # also refuses paths like ../x
        raise ValueError(f'checkpoint at {directory}: invalid payload name {name!r}')
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f'checkpoint at {directory}: payload {name} is missing')
    if _file_sha256(path) != entry.get('sha256'):
        raise ValueError(f'{path} is corrupt: its sha256 does not match the manifest')
    try:
        return torch.load(path, map_location = map_location, weights_only = True)
    except pickle.UnpicklingError as error:
        raise ValueError(f'{path} holds objects other than tensors and plain containers; refusing to unpickle them: {error}') from error
