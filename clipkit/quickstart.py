"""The offline quickstart: toy shards of the config's modality and text → train on the CPU → zero-shot
accuracy → FAISS text search."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from clipkit.config import ExperimentConfig, ModelConfig
from clipkit.data.pipeline import CLASS_LABEL_FIELD, METADATA_FIELD
from clipkit.data.toy_worlds import toy_world
from clipkit.eval.benchmark import zeroshot_metrics
from clipkit.eval.embed import embed_shards
from clipkit.eval.zeroshot import ZeroShotResult
from clipkit.train.trainer import Trainer
from retrieval import Hit, RetrievalIndex


@dataclass(frozen=True)
class QuickstartResult:
    zeroshot: ZeroShotResult
    queries: dict[str, list[Hit]]
    checkpoint: Path
    seconds: float


def describe_towers(model: ModelConfig) -> str:
    """What trains against what, e.g. "the image tower + 2-layer text transformer" or "the audio tower
    against the locked image tower (locked 2-layer text transformer carried along)"."""
    def tower(name: str) -> str:
        label = f"{model.text.layers}-layer text transformer" if name == "text" else f"{name} tower"
        return f"locked {label}" if getattr(model, name).lock else label

    first, second, *others = model.modalities
    pair = (f"the {tower(second)} against the {tower(first)}" if getattr(model, first).lock
            else f"the {tower(first)} + {tower(second)}")
    return f"{pair} ({', '.join(map(tower, others))} carried along)" if others else pair


def run_quickstart(
    config: ExperimentConfig,
    cache_dir: Path,
    *,
    num_train: int | None = None,
    num_eval: int | None = None,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> QuickstartResult:
    """Run every step of the quickstart, printing what each one did."""
    start = time.perf_counter()
    world = toy_world(config.model)
    modality = world.modality
    num_train, num_eval = num_train or world.num_train, num_eval or world.num_eval
    print(f"[1/4] toy data: {num_train} training + {num_eval} held-out {modality}-caption pairs in {cache_dir}")
    toy = world.make(config.model, cache_dir / world.folder(config.model), num_train, num_eval, config.train.seed, samples_per_shard)
    print(f"      {len(toy.classnames)} classes in {toy.root}; ready after {time.perf_counter() - start:.0f} s")
    # The learning curve is measured on the first held-out shard (1000 samples), so that evaluating
    # during training stays a few percent of it; the final figures below cover every held-out sample.
    data = dataclasses.replace(config.data, train_shards=toy.shard_pattern("train"), eval_shards=str(toy.eval_shards[0]))
    config = dataclasses.replace(config, data=data)

    trainer = Trainer(config, progress=progress)
    print(f"[2/4] training {describe_towers(config.model)} on {trainer.device.type}: "
          f"{trainer.total_steps} steps of {data.batch_size}")
    trained = trainer.fit()
    if trained.interrupted:  # Ctrl-C or SIGTERM: the checkpoint is saved; evaluating half a run helps nobody
        raise InterruptedError(f"training stopped by a signal after {trained.steps} steps; "
                               f"checkpoint: {trained.checkpoint}")
    print(f"      {trained.samples} samples in {trained.seconds:.0f} s "
          f"({trained.samples / trained.seconds:.0f}/s), final loss {trained.final_loss:.3f}")
    print(f"      checkpoint: {trained.checkpoint}")

    if trained.evaluation is None:
        raise RuntimeError("the quickstart's training ran no evaluation: its config needs train.eval_every")
    model = trainer.model.eval()
    # Every held-out sample embedded once, for both the zero-shot figures and the index.
    features, fields = embed_shards(model, modality, [str(p) for p in toy.eval_shards],
                                    batch_size=data.batch_size, extra_fields=[CLASS_LABEL_FIELD, METADATA_FIELD])
    metrics, _ = zeroshot_metrics(model, features, fields["label"], toy.classnames, toy.templates, data.batch_size)
    zeroshot = ZeroShotResult(top1=metrics["acc1"], top5=metrics["acc5"],
                              mean_per_class_recall=metrics["mean_per_class_recall"],
                              num_samples=len(features), num_classes=len(toy.classnames))
    print(f"[3/4] zero-shot classification of {zeroshot.num_samples} held-out {modality} samples over "
          f"{zeroshot.num_classes} classes ({len(toy.templates)} prompt templates each):")
    top5 = f"{zeroshot.top5:.1%}" if zeroshot.top5 is not None else "n/a"
    print(f"      top-1 {zeroshot.top1:.1%}   top-5 {top5}   chance {zeroshot.chance:.1%}   "
          f"(the evaluations during training took {trained.eval_seconds:.0f} s, "
          f"{trained.eval_seconds / trained.seconds:.1%} of it)")

    index = RetrievalIndex.build(features, fields["metadata"], kind="exact")
    print(f"[4/4] exact FAISS index of {len(index)} held-out {modality} samples; top 5 for two text queries:")
    results = {}
    for query in world.queries:
        results[query] = index.search_text(query, model, k=5)
        print(f"      {query!r}")
        for hit in results[query]:
            print(f"        {hit.score:+.3f}  {hit.metadata.get('caption', '')}")
    seconds = time.perf_counter() - start
    print(f"quickstart finished in {seconds:.0f} s")
    return QuickstartResult(zeroshot, results, trained.checkpoint, seconds)
