"""Reference data for the CLI: a Hub dataset id, a folder saved with ``save_to_disk``, or an image folder.

:func:`load_reference_dataset` returns one split as a ``datasets.Dataset``. Splits may carry slices
(``test[:5%]``, ``train[100:600]``, ``test+validation``). Without ``--dataset`` the first dataset named
in the model card's ``datasets:`` metadata is used. Every failure is a one-line
:class:`~hub_backdoor.errors.DatasetError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DatasetError, EmptyDatasetError, HubBackdoorError
from .hub import check_repo_id, parse_repo_ref, raise_hub_error

__all__ = [
    "IMAGE_SUFFIXES",
    "PREFERRED_SPLITS",
    "LoadedDataset",
    "dataset_from_card",
    "load_reference_dataset",
    "looks_like_path",
]

#: Split used when none is given, in order of preference.
PREFERRED_SPLITS = ("test", "validation", "valid", "val", "train")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class LoadedDataset:
    """One split of reference data and where it came from.

    Attributes:
        dataset: the ``datasets.Dataset``.
        name: Hub dataset id, or the folder as given.
        kind: ``"hub"``, ``"disk"`` (``save_to_disk``) or ``"imagefolder"``.
        split: the split (with its slice) that was loaded, or None for a single-split folder.
        revision: Hub revision asked for (``id@revision``), or None.
        from_card: True when the dataset came from the model card's ``datasets:`` metadata.
    """

    dataset: Any
    name: str
    kind: str
    split: str | None
    revision: str | None = None
    from_card: bool = False

    @property
    def is_hub(self) -> bool:
        return self.kind == "hub"


def dataset_from_card(metadata: dict[str, Any] | None) -> str | None:
    """The first dataset named in a card's ``datasets:`` metadata, if any."""
    if not metadata:
        return None
    value = metadata.get("datasets")
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str) and item.strip():
                return item.strip()
    return None


def looks_like_path(spec: str) -> bool:
    """True when ``spec`` is written as a path (``./x``, ``/x``, ``~/x``, ``x/y/z``), not a Hub id."""
    return (
        spec.startswith((".", "/", "~", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
        or spec.split("@", 1)[0].replace("\\", "/").strip("/").count("/") >= 2  # org/name@refs/pr/1 is an id
    )


def load_reference_dataset(
    spec: str | None,
    *,
    split: str | None = None,
    card_metadata: dict[str, Any] | None = None,
    model_label: str = "the model",
    token: str | bool | None = None,
    streaming: bool = False,
) -> LoadedDataset:
    """Load the reference split named by ``spec`` (or by the model card when ``spec`` is None);
    ``streaming``: as a ``datasets.IterableDataset`` read once, in order (a Hub split is streamed
    from its files; a local one is read from its files batch by batch)."""
    from_card = False
    if spec is None or not str(spec).strip():
        spec = dataset_from_card(card_metadata)
        if spec is None:
            raise DatasetError(
                f"no --dataset given and the model card of {model_label} names no dataset "
                "(no 'datasets:' metadata); pass --dataset"
            )
        from_card = True
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.exists():
        loaded = _load_local(path, spec, split)
    elif looks_like_path(spec):
        raise DatasetError(f"dataset folder {spec} does not exist")
    else:
        loaded = _load_hub(spec, split, token, streaming)
    if streaming and loaded.kind != "hub":
        loaded.dataset = loaded.dataset.to_iterable_dataset()
    loaded.from_card = from_card
    return loaded


# -- local --------------------------------------------------------------------------------------------
def _load_local(path: Path, spec: str, split: str | None) -> LoadedDataset:
    import datasets

    if not path.is_dir():
        raise DatasetError(
            f"dataset {spec} is a file; pass a Hub dataset id, a folder saved with save_to_disk, or an "
            "image folder (one subfolder of images per class)"
        )
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            ds = datasets.load_from_disk(str(path))
        except IndexError:  # datasets cannot load a saved dataset of 0 rows
            raise EmptyDatasetError(f"the saved dataset {spec} holds no rows; pass one with labelled "
                                    "images") from None
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DatasetError(f"cannot load the saved dataset {spec} ({_first_line(e)})") from None
        if isinstance(ds, datasets.DatasetDict):
            chosen, name = _pick_split(ds, split, spec)
            return LoadedDataset(chosen, spec, "disk", name)
        if split is not None:
            ds = _slice_single(ds, split, spec)
        return LoadedDataset(ds, spec, "disk", split)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file()):
        raise DatasetError(
            f"folder {spec} is neither a dataset saved with save_to_disk nor an image folder (no images "
            "found)"
        )
    try:
        dd = datasets.load_dataset("imagefolder", data_dir=str(path))
    except (FileNotFoundError, ValueError, OSError, datasets.exceptions.DatasetsError) as e:
        raise DatasetError(f"cannot read image folder {spec} ({_first_line(e)})") from None
    chosen, name = _pick_split(dd, split, spec)
    return LoadedDataset(chosen, spec, "imagefolder", name)


def _pick_split(dd: Any, split: str | None, where: str) -> tuple[Any, str]:
    names = list(dd)
    if not names:
        raise DatasetError(f"dataset {where} has no splits")
    if split is None:
        split = next((s for s in PREFERRED_SPLITS if s in dd), names[0] if len(names) == 1 else None)
        if split is None:
            raise DatasetError(f"dataset {where} has splits {names}; choose one with --split")
        return dd[split], split
    instructions = _instructions(split, {n: len(dd[n]) for n in names}, where)
    return _apply(dd, instructions), split


def _slice_single(ds: Any, split: str, where: str) -> Any:
    """Apply the slice of ``split`` to a single-split dataset (the split name itself is not checked)."""
    m = re.match(r"^\s*([\w.-]+)\s*(\[.*\])?\s*$", split)
    if m is None:
        raise DatasetError(f"invalid --split {split!r}; expected e.g. test, test[:5%] or train[100:600]")
    name = m.group(1)
    instructions = _instructions(split, {name: len(ds)}, where)
    return _apply({name: ds}, instructions)


def _instructions(split: str, sizes: dict[str, int], where: str) -> list[Any]:
    import datasets

    try:
        ri = datasets.ReadInstruction.from_spec(split.replace(" ", ""))
    except (ValueError, AssertionError) as e:
        raise DatasetError(
            f"invalid --split {split!r} ({_first_line(e)}); expected e.g. test, test[:5%] or train[100:600]"
        ) from None
    try:
        out = ri.to_absolute(sizes)
    except (ValueError, KeyError, AssertionError) as e:
        msg = _first_line(e)
        if "Unknown split" in msg or isinstance(e, KeyError):
            raise DatasetError(f"no split {split!r} in dataset {where}; splits are {list(sizes)}") from None
        raise DatasetError(f"invalid --split {split!r} for dataset {where} ({msg})") from None
    for i in out:  # a slice past the end selects nothing (or fails in select): say so now
        n = sizes[i.splitname]
        if not 0 <= i.from_ < i.to <= n:
            raise DatasetError(
                f"--split {split!r} selects no rows of split {i.splitname!r} of dataset {where}, which has "
                f"{n} rows (slices are clipped to the split); choose a slice inside it"
            )
    return out


def _apply(dd: Any, instructions: list[Any]) -> Any:
    import datasets

    parts = [dd[i.splitname].select(range(i.from_, i.to)) for i in instructions]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


# -- Hub ----------------------------------------------------------------------------------------------
def _load_hub(
    spec: str, split: str | None, token: str | bool | None, streaming: bool = False
) -> LoadedDataset:
    """A Hub split, loaded (indexable) or (``streaming``) as a stream; a streamed slice must be
    absolute (``test[:5000]``, ``test[100:600]``): a stream's length is unknown until it is read."""
    import datasets

    repo_id, revision = parse_repo_ref(spec)
    check_repo_id(repo_id)
    where = f"'{repo_id}'" + (f"@{revision}" if revision else "")
    name, start, stop = (_stream_slice(split) if streaming else (split, 0, None))
    try:
        if name is None:
            names = datasets.get_dataset_split_names(repo_id, revision=revision, token=token)
            name = next((s for s in PREFERRED_SPLITS if s in names), names[0] if len(names) == 1 else None)
            if name is None:
                raise DatasetError(f"dataset {where} has splits {names}; choose one with --split")
        ds = datasets.load_dataset(repo_id, split=name, revision=revision, token=token, streaming=streaming)
    except HubBackdoorError:
        raise
    except Exception as e:  # mapped below; anything unknown is re-raised
        _raise_dataset_error(e, repo_id, revision, name, where)
    if streaming:
        ds = ds.skip(start) if start else ds
        ds = ds.take(stop - start) if stop is not None else ds
    elif isinstance(ds, datasets.IterableDataset) or not isinstance(ds, datasets.Dataset):
        raise DatasetError(f"dataset {where} did not load as one indexable split")
    return LoadedDataset(ds, repo_id, "hub", split or name, revision)


def _stream_slice(split: str | None) -> tuple[str | None, int, int | None]:
    """``test[100:600]`` -> ``("test", 100, 600)``: the split name and an absolute slice."""
    m = re.match(r"^\s*([\w.-]+)\s*(?:\[\s*(\d*)\s*:\s*(\d*)\s*\])?\s*$", split or "")
    if split is None:
        return None, 0, None
    if m is None:
        raise DatasetError(f"--split {split!r} with --streaming: name one split with an optional absolute "
                           "slice, e.g. test or test[:5000]")
    start = int(m.group(2)) if m.group(2) else 0
    stop = int(m.group(3)) if m.group(3) else None
    if stop is not None and stop <= start:
        raise DatasetError(f"--split {split!r} selects no rows")
    return m.group(1), start, stop


def _raise_dataset_error(
    e: BaseException, repo_id: str, revision: str | None, split: str | None, where: str
) -> None:
    import datasets
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.errors import RevisionNotFoundError as HfRevisionNotFoundError

    msg = _first_line(e)
    if isinstance(e, HfRevisionNotFoundError) or (
        "revision" in msg.lower() and "not" in msg.lower() and revision is not None
    ):
        raise DatasetError(
            f"revision '{revision}' not found in dataset '{repo_id}' on {constants.ENDPOINT}"
        ) from None
    if isinstance(e, (datasets.exceptions.DatasetNotFoundError, RepositoryNotFoundError)):
        raise DatasetError(
            f"dataset '{repo_id}' not found on {constants.ENDPOINT} (check the id, or log in for a private "
            "dataset)"
        ) from None
    if isinstance(e, ValueError) and "split" in msg.lower():
        raise DatasetError(f"dataset {where}: {msg}") from None
    if isinstance(
        e,
        (
            datasets.exceptions.DataFilesNotFoundError,
            datasets.data_files.EmptyDatasetError,
            FileNotFoundError,
        ),
    ):
        raise DatasetError(f"dataset {where} has no data files datasets can read ({msg})") from None
    if isinstance(e, HfHubHTTPError):
        raise_hub_error(e, repo_id=repo_id, revision=revision, repo_type="dataset")
    if isinstance(e, (ConnectionError, OSError)):
        raise DatasetError(f"cannot load dataset {where} ({type(e).__name__}: {msg})") from None
    raise e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if text.startswith(("'", '"')) and text.endswith(("'", '"')) and isinstance(e, KeyError):
        text = text[1:-1]
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
