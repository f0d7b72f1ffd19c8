"""Versioned memory checkpoints on disk: a base snapshot plus one patch per update.

Layout of the checkpoint folder:
    manifest.json            current version, base version, the settings the state was created
                             with (memory shape, healing, background text, model), update history
    base.safetensors         the memory at `base_version`: addressing parameters, the value rows
                             written so far (`<layer>.values.slot_ids` / `.rows`), background statistics
    general_text.safetensors the general-text token ids behind the statistics
    fact_text.safetensors    the model's own statements of fact (the retain penalty's text)
    patches/NNNNNNNN.safetensors   the update that produced version NNNNNNNN

A version is the base plus the patches up to it: nothing else is stored. Value rows are stored
sparsely (smfd.model.sparse_rows): only rows an update wrote, so every file grows with what was
learned, not with the memory's slot count, and replaying `keep` patches on load takes milliseconds.

Any version from `base_version` to `version` is reproducible exactly (base + patches), so
rollback is exact. Only the last `keep` patches are kept: older ones are folded into the base.
Every file is written atomically (temp file, fsync, rename); the manifest is written last, so
a crash mid-commit leaves the previous version intact. The manifest records each file's SHA-256
(`files`), checked before the file is used (smfd.store.integrity): a damaged value cache is
rebuilt from base + patches, a damaged patch makes the state fall back to the version before it
(with a warning), and a damaged base is refused with a message naming the file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smfd.durable import atomic_write, atomic_write_json
from smfd.errors import SmfdError
from smfd.model.batch import packed, unpacked
from smfd.model.memory_model import MemoryModel
from smfd.model.slot_stats import BACKGROUND_PREFIX, BackgroundStats, background_from_tensors, background_to_tensors
from smfd.model.sparse_rows import merged_rows
from smfd.store.created_settings import changed_settings
from smfd.store.history import CommittedDocument, committed_in, last_fill
from smfd.store.integrity import DamagedState, file_digest, is_intact
from smfd.store.patches import LayerPatch, apply_patches, load_patches, patch_problem, save_patches

log = structlog.get_logger("smfd.store.checkpoint")
BASE = "base.safetensors"

# The state format. 2: settings recorded as the config schema's sections (memory shape incl. seed,
# healing incl. seed). 3: value rows stored sparsely (format 2 states are converted once by their
# owner: smfd.store.upgrade). Older formats are refused.
FORMAT = 3
DENSE_FORMAT = 2


def _values_prefix(layer: int) -> str:
    return f"{layer}.values."


class CheckpointStore:
    def __init__(self, folder: Path, keep: int = 5) -> None:
        if keep < 1:
            raise SmfdError(f"checkpoint.keep must be >= 1, got {keep}")
        self.folder = folder
        self.keep = keep
        self.manifest_path = folder / "manifest.json"
        self.patch_dir = folder / "patches"

    # ---- manifest -------------------------------------------------------------
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise SmfdError(f"no checkpoint in {self.folder}") from None
        except json.JSONDecodeError as exc:
            raise SmfdError(f"checkpoint manifest {self.manifest_path} is corrupt: {exc}") from exc
        if manifest.get("format") == DENSE_FORMAT:
            raise SmfdError(
                f"checkpoint {self.folder} was written by an earlier smfd with dense value tables (format 2): "
                "start the daemon (or `smfd --config ... --once`) once and it converts the state, exactly"
            )
        if manifest.get("format") != FORMAT:
            raise SmfdError(
                f"checkpoint {self.folder} has state format {manifest.get('format')}, this smfd reads format {FORMAT}: "
                "move the state_dir away to start learning again from the base model (the documents in its "
                "spool can be dropped into the inbox again), or run the smfd version that wrote it"
            )
        return manifest

    def check_settings(self, settings: dict, n_layers: int | None = None) -> None:
        """Refuse a config whose creation-time settings differ from the ones this state was made with.

        Memory shape, read temperature, healing and the background text are baked into version 0
        (healed keys, calibrated queries, slot statistics) and every patch since was learned
        under them; loading the rows under other settings would read them wrongly without any
        error. With the model's depth `n_layers`, memory layers are compared as the blocks they name,
        so `[28]` and `[-2]` are the same on a 30-layer model.
        """
        manifest = self.manifest()
        recorded = dict(manifest.get("settings") or {})
        changed = changed_settings(recorded, settings, n_layers)
        if changed:
            raise SmfdError(
                f"the checkpoint in {self.folder} was created with other settings ({'; '.join(changed)}): "
                "these take effect only in a fresh state: restore the old values, or move the state_dir "
                "away to start learning again from the base model"
            )

    @property
    def version(self) -> int:
        return int(self.manifest()["version"])

    def _patch_name(self, version: int) -> str:
        return f"patches/{version:08d}.safetensors"

    def _patch_path(self, version: int) -> Path:
        return self.folder / self._patch_name(version)

    # ---- writing --------------------------------------------------------------
    def initialise(
        self,
        model: MemoryModel,
        background: dict[int, BackgroundStats],
        meta: dict | None = None,
        settings: dict | None = None,
    ) -> None:
        """Write version 0: the freshly attached (and possibly healed) memory and its background statistics.

        `settings` are the choices that shaped version 0 and that a later config cannot change
        for this state (see `check_settings`).
        """
        self.patch_dir.mkdir(parents=True, exist_ok=True)
        self._write_base(model.memory_state(), background)
        manifest = {
            "format": FORMAT,
            "version": 0,
            "base_version": 0,
            "memory": model.memory_config.shape(),
            "model": model.source.display_name if model.source else None,
            "created_at": time.time(),
            "settings": settings or {},
            "history": [{"version": 0, "timestamp": time.time(), **(meta or {})}],
        }
        names = [BASE, *(f"{text}.safetensors" for text in ("general_text", "fact_text"))]
        manifest["files"] = {name: file_digest(self.folder / name) for name in names if (self.folder / name).is_file()}
        atomic_write_json(self.manifest_path, manifest)

    def commit(self, patches: list[LayerPatch], meta: dict, documents: dict[int, list[int]] | None = None) -> int:
        """Record an update (already applied to the model in memory); returns the new version.

        `documents` maps each journal document id in the update to the chunk ids it learned. They
        are written into the patch and the manifest in the same durable step as the update, so a
        restart can tell that a document left `processing` by a crash is already learned
        (`committed_documents`) instead of learning it a second time.
        """
        meta = {**meta, "documents": {str(doc_id): list(ids) for doc_id, ids in (documents or {}).items()}}
        manifest = self.manifest()
        version = int(manifest["version"]) + 1
        atomic_write(self._patch_path(version), lambda tmp: save_patches(tmp, patches, {"version": version, **meta}))
        files = manifest.setdefault("files", {})
        files[self._patch_name(version)] = file_digest(self._patch_path(version))
        manifest["version"] = version
        manifest["history"] = (manifest["history"] + [{"version": version, "timestamp": time.time(), **meta}])[-1000:]
        atomic_write_json(self.manifest_path, manifest)  # the commit point: from here on, version is on disk
        try:
            self._fold_old_patches()
        except (OSError, SmfdError) as exc:  # housekeeping only, after the commit point: the next commit folds again
            log.warning("patch_fold_deferred", version=version, reason=str(exc))
        return version

    def save_text(self, name: str, sequences: list[list[int]]) -> None:
        """Keep token sequences the state was built from (`general_text`, `fact_text`): a restart needs no resampling."""
        tensors = packed(sequences)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write(self.folder / f"{name}.safetensors", lambda tmp: save_file(tensors, str(tmp)))

    def load_text(self, name: str) -> list[list[int]] | None:
        """The saved sequences, or None for a checkpoint written before they were kept."""
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        digests = self.manifest().get("files", {}) if self.exists() else {}
        if not is_intact(self.folder, path.name, digests):
            log.warning("state_file_damaged", file=str(path), action="not used; the retain penalty goes without it")
            return None
        tensors = load_file(str(path))
        return unpacked(tensors["ids"], tensors["lengths"])

    def _write_base(self, state: dict[str, torch.Tensor], background: dict[int, BackgroundStats]) -> None:
        tensors = {**state, **background_to_tensors(background)}
        atomic_write(self.folder / BASE, lambda tmp: save_file(tensors, str(tmp)))

    def _fold_old_patches(self) -> None:
        """Keep at most `keep` patches: apply the oldest ones to the base snapshot and delete them."""
        manifest = self.manifest()
        base_version, version = int(manifest["base_version"]), int(manifest["version"])
        if version - base_version <= self.keep:
            return
        base = self._load_verified(BASE, manifest)
        new_base_version = version - self.keep
        for v in range(base_version + 1, new_base_version + 1):
            patches, _ = self._load_patch(v, manifest)
            for patch in patches:
                prefix = _values_prefix(patch.layer)
                stored = {name: base[prefix + name] for name in ("slot_ids", "rows", "floors") if prefix + name in base}
                merged = merged_rows(stored, patch.slot_ids, patch.after, patch.floor_after)
                base.update({prefix + name: tensor for name, tensor in merged.items()})
        atomic_write(self.folder / BASE, lambda tmp: save_file(base, str(tmp)))
        manifest["base_version"] = new_base_version
        files = manifest.setdefault("files", {})
        files[BASE] = file_digest(self.folder / BASE)
        for v in range(base_version + 1, new_base_version + 1):
            files.pop(self._patch_name(v), None)
        atomic_write_json(self.manifest_path, manifest)
        for v in range(base_version + 1, new_base_version + 1):
            self._patch_path(v).unlink(missing_ok=True)

    def remove_stray_patches(self) -> list[Path]:
        """Delete patch files outside base_version+1..version: an interrupted commit's, a fold's or a rollback's."""
        manifest = self.manifest()
        wanted = {self._patch_path(v) for v in range(int(manifest["base_version"]) + 1, int(manifest["version"]) + 1)}
        strays = [p for p in self.patch_dir.glob("*.safetensors") if p not in wanted] if self.patch_dir.is_dir() else []
        for stray in strays:
            stray.unlink(missing_ok=True)
        return strays

    # ---- reading --------------------------------------------------------------
    def memory_fill(self) -> dict | None:
        """How full the memory was after the current version's update (recorded at commit), or None."""
        return last_fill(self.manifest()["history"])

    def row_retrainings(self) -> int:
        """Rows trained again by the updates the current version descends from (0 for a state without the count)."""
        fill = self.memory_fill() if self.exists() else None
        return int(fill.get("row_retrainings", 0)) if fill else 0

    def committed_documents(self) -> dict[int, CommittedDocument]:
        """Every document learned by a version the current one descends from (rolled-back versions excluded)."""
        return committed_in(self.manifest()["history"])

    def load_into(self, model: MemoryModel, repair: bool = True) -> tuple[int, dict[int, BackgroundStats]]:
        """Restore the memory at the manifest's version (or the last intact one); returns (version, background).

        The base and every patch are checked against their recorded digests, and a patch's rows against
        its slot ids and the memory's shape, before use. A damaged patch drops the memory back to the
        version before it, with a warning. With `repair` (only for the state's owner, under the state
        lock) the manifest falls back too; a reader (`smfd ask`, `smfd probe` beside a running daemon)
        never writes.
        """
        manifest = self.manifest()
        background = background_from_tensors(self._load_base_into(model, manifest))
        base_version, version = int(manifest["base_version"]), int(manifest["version"])
        for v in range(base_version + 1, version + 1):
            try:
                patches, _ = self._load_patch(v, manifest, model)
            except DamagedState:
                if repair:
                    self._fall_back(manifest, v - 1, damaged=v)
                else:
                    log.warning("checkpoint_patch_damaged", damaged=str(self._patch_path(v)), using_version=v - 1)
                return v - 1, background
            apply_patches(model.memories, patches)
        return version, background

    def _fall_back(self, manifest: dict, target: int, damaged: int) -> None:
        version = int(manifest["version"])
        log.warning(
            "checkpoint_fell_back",
            damaged=str(self._patch_path(damaged)),
            version=target,
            was=version,
            reason="a patch is damaged or missing; its documents and later ones are no longer held",
        )
        self._drop_versions_above(manifest, target, reason=f"patch {damaged} damaged")

    def _drop_versions_above(self, manifest: dict, target: int, **history: object) -> None:
        """Make `target` the manifest's version (recorded as a rollback) and delete the patches above it."""
        version = int(manifest["version"])
        for v in range(target + 1, version + 1):
            manifest.setdefault("files", {}).pop(self._patch_name(v), None)
        manifest["version"] = target
        manifest["history"].append({"version": target, "timestamp": time.time(), "rollback_from": version, **history})
        atomic_write_json(self.manifest_path, manifest)
        for v in range(target + 1, version + 1):
            self._patch_path(v).unlink(missing_ok=True)

    def _load_verified(self, name: str, manifest: dict) -> dict[str, torch.Tensor]:
        """Load a file that cannot be rebuilt, refusing it (one line naming it) when missing or damaged."""
        path = self.folder / name
        if not path.is_file():
            raise DamagedState(path, "missing")
        if not is_intact(self.folder, name, manifest.get("files", {})):
            raise DamagedState(path, "checksum mismatch")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DamagedState(path, f"unreadable: {exc}") from exc

    def _load_base_into(self, model: MemoryModel, manifest: dict) -> dict[str, torch.Tensor]:
        """Set `model`'s memory to the verified base snapshot; returns the snapshot (with its background statistics)."""
        base = self._load_verified(BASE, manifest)
        state = {k: v for k, v in base.items() if not k.startswith(BACKGROUND_PREFIX)}
        model.load_memory_state(state, source=str(self.folder / BASE))
        return base

    def _load_patch(
        self, version: int, manifest: dict, model: MemoryModel | None = None
    ) -> tuple[list[LayerPatch], dict[str, object]]:
        """A verified patch; with `model`, also checked to fit its memory (rows agree with slot ids and shape)."""
        name = self._patch_name(version)
        if not is_intact(self.folder, name, manifest.get("files", {})):
            raise DamagedState(self.folder / name, "missing or checksum mismatch")
        try:
            patches, meta = load_patches(self.folder / name)
        except (SafetensorError, OSError, KeyError, ValueError, IndexError, RuntimeError) as exc:
            raise DamagedState(self.folder / name, f"unreadable: {exc}") from exc
        problem = patch_problem(model.memories, patches) if model is not None else ""
        if problem:
            raise DamagedState(self.folder / name, problem)
        return patches, meta

    def _replay(self, model: MemoryModel, from_version: int, to_version: int, manifest: dict) -> None:
        for v in range(from_version + 1, to_version + 1):
            patches, _ = self._load_patch(v, manifest, model)
            apply_patches(model.memories, patches)

    def rollback(self, model: MemoryModel, target: int) -> int:
        """Set `model` and the state on disk to version `target` exactly: base + the patches up to it.

        Replaying from the base needs none of the patches above `target`, so a damaged newer patch
        cannot stop a rollback past it.
        """
        manifest = self.manifest()
        version, base_version = int(manifest["version"]), int(manifest["base_version"])
        if not base_version <= target <= version:
            raise SmfdError(f"cannot roll back to version {target}: versions {base_version}..{version} are available")
        self._load_base_into(model, manifest)
        self._replay(model, base_version, target, manifest)
        self._drop_versions_above(manifest, target)
        return target
