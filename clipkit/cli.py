"""The ``clipkit`` command: make-toy, make-shards, train, plot, eval, embed, index, search,
export-open-clip, wise-ft, quickstart, configs.

Building the parser imports nothing heavy (no torch, timm, open_clip or FAISS): ``clipkit --help``
answers at once, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from clipkit import __version__
from clipkit.config import ConfigError, ExperimentConfig, bundled_configs, load_config, resolve_config_path
from clipkit.errors import ClipkitError, PretrainedWeightsError
from clipkit.eval.layout import CLASSNAMES_FILE, TEMPLATES_FILE
from retrieval.cli import add_index_commands

DEFAULT_CACHE = Path(os.environ.get("CLIPKIT_CACHE", Path.home() / ".cache" / "clipkit"))
QUICKSTART_CONFIG = "configs/toy-image-text.yaml"


def _load(args: argparse.Namespace, extra_overrides: Sequence[str] = ()) -> ExperimentConfig:
    return load_config(resolve_config_path(args.config), [*args.set, *extra_overrides])


def _add_config_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--config", required=default is None, default=default,
                        help="YAML config file, or the name of a bundled one (see `clipkit configs`)"
                             + (f"; default {default}" if default else ""))
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )


def _add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def cmd_configs(args: argparse.Namespace) -> None:
    for path in bundled_configs():
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        print(f"configs/{path.name:<28} {first.lstrip('# ')}")
    print(f"(bundled in {bundled_configs()[0].parent}; any command's --config takes these names from any folder)")


def cmd_make_toy(args: argparse.Namespace) -> None:
    from clipkit.data.toy_worlds import toy_world

    model = _load(args).model
    world = toy_world(model)
    out = Path(args.out or f"toy-data/{world.name}")  # where the toy configs look for shards
    toy = world.make(model, out, args.num_train or world.num_train, args.num_eval or world.num_eval,
                     args.seed, args.samples_per_shard)
    print(f"train shards: {toy.shard_pattern('train')}")
    print(f"eval shards:  {toy.shard_pattern('eval')}")
    print(f"{len(toy.classnames)} classes in {toy.root / 'classnames.txt'}")


def cmd_make_shards(args: argparse.Namespace) -> None:
    from clipkit.data.make_shards import MakeShardsError, make_shards

    try:
        result = make_shards(
            args.input, args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
            workers=args.workers, image_col=args.image_col, caption_col=args.caption_col,
            label_col=args.label_col, classnames_file=args.classnames, class_folders=args.class_folders,
            progress=not args.no_progress,
        )
    except MakeShardsError as err:
        print(f"clipkit: make-shards: {err}", file=sys.stderr)
        raise SystemExit(2) from err  # the exit code of a usage error, like a bad config
    print(result.summary())


def _encoder(args: argparse.Namespace):
    from clipkit.eval.encoders import load_encoder

    return load_encoder(args.model, args.pretrained, device=args.device, allow_download=args.allow_download)


def _print_report(report, output: str | None) -> None:
    print(report.table())
    if output:
        print(f"results: {report.write(output)}")


def cmd_eval_zeroshot(args: argparse.Namespace) -> None:
    from clipkit.eval.benchmark import evaluate_zeroshot
    from clipkit.eval.classifier_cache import ClassifierCache

    report = evaluate_zeroshot(
        _encoder(args), args.dataset, modality=args.modality, classnames_file=args.classnames,
        templates=args.templates, batch_size=args.batch_size, num_workers=args.num_workers,
        cache=None if args.no_cache else ClassifierCache(DEFAULT_CACHE / "zeroshot-classifiers"),
        confusion_png=args.confusion_matrix, path_col=args.path_col, label_col=args.label_col,
        split=args.split, progress=not args.no_progress,
    )
    _print_report(report, args.output)


def cmd_eval_retrieval(args: argparse.Namespace) -> None:
    from clipkit.eval.benchmark import evaluate_retrieval

    report = evaluate_retrieval(
        _encoder(args), args.dataset, modality=args.modality, batch_size=args.batch_size,
        num_workers=args.num_workers, path_col=args.path_col, caption_col=args.caption_col,
        split=args.split, progress=not args.no_progress,
    )
    _print_report(report, args.output)


def cmd_eval_knn(args: argparse.Namespace) -> None:
    from clipkit.eval.knn import evaluate_knn

    report = evaluate_knn(
        _encoder(args), args.train_dataset, args.dataset, modality=args.modality, k=args.k,
        temperature=args.temperature, shots=args.shots, draws=args.draws, seed=args.seed,
        classnames_file=args.classnames, train_split=args.train_split, split=args.split, path_col=args.path_col,
        label_col=args.label_col, batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress,
    )
    _print_report(report, args.output)


def cmd_eval_linear_probe(args: argparse.Namespace) -> None:
    from clipkit.eval.linear_probe import ProbeSettings, evaluate_linear_probe

    settings = ProbeSettings(lr=args.lr, epochs=args.epochs, batch_size=args.probe_batch_size, seed=args.seed)
    report = evaluate_linear_probe(
        _encoder(args), args.train_dataset, args.dataset, modality=args.modality, val_dataset=args.val_dataset,
        val_split=args.val_split, val_proportion=args.val_proportion, settings=settings, shots=args.shots,
        draws=args.draws, classnames_file=args.classnames, train_split=args.train_split, split=args.split,
        path_col=args.path_col, label_col=args.label_col, batch_size=args.batch_size, num_workers=args.num_workers,
        progress=not args.no_progress,
    )
    _print_report(report, args.output)


def cmd_embed(args: argparse.Namespace) -> None:
    from clipkit.distributed import init_distributed
    from clipkit.eval.embed_dir import RANKS_WAIT, embed_to_dir
    from clipkit.eval.encoders import load_encoder

    # Under torchrun each rank takes its share of the parts on its own GPU; the ranks meet only to
    # merge their records, over gloo.
    job = init_distributed(args.device, backend="gloo", timeout=RANKS_WAIT)
    encoder = load_encoder(args.model, args.pretrained, device=str(job.device), allow_download=args.allow_download)
    summary = embed_to_dir(encoder, args.modality, args.dataset, args.out, batch_size=args.batch_size,
                           num_workers=args.workers, progress=not args.no_progress)
    if job.is_main:
        print(summary.describe(args.modality, args.out))


def cmd_export_open_clip(args: argparse.Namespace) -> None:
    from clipkit.interop.openclip_export import export_to_open_clip

    folder = export_to_open_clip(args.checkpoint, args.out)
    print(f"open_clip model folder: {folder}")
    print(f"load it with open_clip.create_model_and_transforms('local-dir:{folder}')")


def cmd_wise_ft(args: argparse.Namespace) -> None:
    from clipkit.eval.benchmark import evaluate_zeroshot
    from clipkit.eval.encoders import load_encoder
    from clipkit.wise_ft import write_wise_ft

    try:
        alphas = [float(alpha) for alpha in args.alphas.split(",")]
    except ValueError:
        raise ValueError(f"--alphas must be comma-separated numbers in [0, 1], got {args.alphas!r}") from None
    out = Path(args.out) if args.out else Path(args.finetuned).parent / "wise-ft"
    for alpha, path in zip(alphas, write_wise_ft(args.finetuned, args.original, alphas, out)):
        report = evaluate_zeroshot(load_encoder(str(path), device=args.device), args.dataset,
                                   classnames_file=args.classnames, templates=args.templates,
                                   batch_size=args.batch_size, split=args.split, progress=not args.no_progress)
        acc5 = report.metrics["acc5"]
        top5 = f"acc5 {acc5:.2%}" if acc5 is not None else "acc5 n/a (< 5 classes)"
        print(f"alpha {alpha:.2f}: acc1 {report.metrics['acc1']:.2%}  {top5}  {path}")


def cmd_train(args: argparse.Namespace) -> None:
    from clipkit.data.table_shards import shards_for_tables

    config = _load(args, [f"train.resume={args.resume}"] if args.resume else [])
    # Tables named as shards are converted before torch loads (make-shards forks its workers); under
    # torchrun one rank converts, whichever takes the cache's lock first, and the others reuse.
    config.data, tables = shards_for_tables(config.data, progress=not args.no_progress)
    for table in tables:
        if table.converted or os.environ.get("RANK", "0") == "0":
            print(table.describe())

    from clipkit.distributed import shutdown_distributed
    from clipkit.train.trainer import Trainer

    trainer = None
    finished = False
    try:
        trainer = Trainer(config, progress=not args.no_progress)
        result = trainer.fit()
        if trainer.dist.is_main:
            verb = "stopped by signal after" if result.interrupted else "trained"
            print(f"{verb} {result.steps} steps ({result.samples} samples) in {result.seconds:.0f} s, "
                  f"final loss {result.final_loss:.4f}; skipped samples: {result.skipped}")
            print(f"checkpoint: {result.checkpoint}")
        finished = True
    finally:
        if trainer is not None:
            trainer.close()
        shutdown_distributed(wait_for_others=finished)


def cmd_plot(args: argparse.Namespace) -> None:
    from clipkit.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))


def cmd_quickstart(args: argparse.Namespace) -> None:
    from clipkit.quickstart import run_quickstart

    result = run_quickstart(
        _load(args), Path(args.cache_dir), num_train=args.num_train, num_eval=args.num_eval,
        progress=not args.no_progress,
    )
    if result.zeroshot.top1 < 0.5:
        print(f"warning: zero-shot top-1 {result.zeroshot.top1:.1%} is below the expected 50%", file=sys.stderr)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a clipkit checkpoint, open_clip:ARCH (e.g. open_clip:ViT-B-32) or "
                             "open_clip:local-dir:FOLDER")
    parser.add_argument("--pretrained", help="open_clip weights: a local file or a zoo tag already in the "
                        "Hugging Face cache")
    parser.add_argument("--allow-download", action="store_true", help="let open_clip fetch a zoo tag's weights")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")


def _add_dataset_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dataset", required=True, help=what)
    parser.add_argument("--split", default="test",
                        help="with a CLIP_benchmark dataset folder (ROOT/SPLIT/0.tar ...), the split to read "
                             "(default: test)")


def _add_eval_io_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", default="image", help="the modality of the samples (default: image)")
    parser.add_argument("--path-col", help="CSV column with the file path (default: path / filepath / image)")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default: 256)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="data-loader processes that decode samples (default: 0, in the main process)")
    parser.add_argument("--output", help="write the results as JSON here")
    _add_progress_arg(parser)


def _add_labelled_args(parser: argparse.ArgumentParser, train_what: str) -> None:
    """The arguments of the evaluations that learn from labelled samples (k-NN, linear probe)."""
    _add_model_args(parser)
    _add_dataset_arg(parser, "the labelled samples to classify, as `clipkit eval zeroshot` reads them")
    parser.add_argument("--train-dataset", required=True, help=f"{train_what} (the same kinds of dataset; a "
                        "CLIP_benchmark folder may be the --dataset one)")
    parser.add_argument("--train-split", default="train", help="with a CLIP_benchmark dataset folder, the split "
                        "of --train-dataset to read (default: train)")
    parser.add_argument("--classnames", help="one class name per line, in class-index order, for every dataset "
                        "(default: read from each, as `clipkit eval zeroshot` does)")
    parser.add_argument("--label-col", help="CSV column with the label (default: label / class / cls)")
    parser.add_argument("--shots", type=int, nargs="+", default=[], metavar="N",
                        help="also classify with only N training samples per class, e.g. --shots 1 4 16")
    parser.add_argument("--draws", type=int, default=5, help="random draws per --shots count (default: 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws (and of the probe) (default: 0)")
    _add_eval_io_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipkit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"clipkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    configs = sub.add_parser("configs", help="list the bundled configs (usable by name from any folder)")
    configs.set_defaults(func=cmd_configs)

    toy = sub.add_parser("make-toy", help="write procedural image-, audio- or video-caption webdataset shards "
                         "for a config's modalities (sizes, sample rate, frames from the config)")
    _add_config_args(toy, default=QUICKSTART_CONFIG)
    toy.add_argument("--out", help="output folder (default: toy-data/WORLD, e.g. toy-data/audio-text)")
    toy.add_argument("--num-train", type=int, help="training samples (default: the modality's toy size)")
    toy.add_argument("--num-eval", type=int, help="held-out samples (default: the modality's toy size)")
    toy.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar (default: 1000)")
    toy.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical shards (default: 0)")
    toy.set_defaults(func=cmd_make_toy)

    shards = sub.add_parser("make-shards", help="convert images + captions (or class labels) into webdataset shards")
    shards.add_argument("--input", required=True,
                        help="a folder of images with sidecar .txt captions (with --class-folders: one "
                             "sub-folder per class), or a .csv, .tsv or .jsonl file")
    shards.add_argument("--out", required=True, help="output folder")
    shards.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ... (default: train)")
    shards.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per tar (default: 10000)")
    shards.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all CPUs)")
    shards.add_argument("--image-col", default="image",
                        help="CSV/TSV/JSONL column with the image path (default: image)")
    shards.add_argument("--caption-col",
                        help="CSV/TSV/JSONL column with the caption, or a list of captions (default: caption; "
                             "optional with --label-col)")
    shards.add_argument("--label-col", help="CSV/TSV/JSONL column with a class name or class index: writes "
                        f"KEY.cls and {CLASSNAMES_FILE} (a zero-shot evaluation set)")
    shards.add_argument("--classnames", help="one class name per line, in class-index order: needed for class "
                        "indices, and fixes the order of class names")
    shards.add_argument("--class-folders", action="store_true",
                        help="the input folder holds one sub-folder per class (ImageNet's layout, "
                             "ROOT/CLASS/x.jpg): writes KEY.cls and classnames.txt; captions are optional")
    _add_progress_arg(shards)
    shards.set_defaults(func=cmd_make_shards)

    train = sub.add_parser("train", help="train a contrastive model on webdataset shards (or on a CSV/TSV/JSONL "
                           "of image paths and captions, converted into shards cached beside it)")
    _add_config_args(train, default=None)
    train.add_argument("--resume", metavar="latest|PATH",
                       help="continue from the newest checkpoint in train.output_dir, or from a checkpoint file")
    _add_progress_arg(train)
    train.set_defaults(func=cmd_train)

    plot = sub.add_parser("plot", help="draw a training run's metrics.jsonl as a PNG: loss, learning rate, "
                          "temperature and the evaluation metrics against steps")
    plot.add_argument("run_dir", metavar="RUN_DIR", help="the run's folder (train.output_dir), with metrics.jsonl")
    plot.add_argument("--out", metavar="PNG", help="the image to write (default: RUN_DIR/metrics.png; a .pdf or "
                      ".svg suffix writes that format)")
    plot.set_defaults(func=cmd_plot)

    evaluate = sub.add_parser("eval", help="evaluate a clipkit or open_clip model").add_subparsers(
        dest="task", required=True)
    zeroshot = evaluate.add_parser("zeroshot", help="zero-shot classification")
    _add_model_args(zeroshot)
    _add_dataset_arg(zeroshot, "shards with a cls member per sample (brace pattern, folder of .tar or a "
                               "CLIP_benchmark dataset folder), a folder with one sub-folder per class, or a CSV "
                               "of path,label")
    zeroshot.add_argument("--classnames", help="one class name per line, in class-index order (default: "
                          f"{CLASSNAMES_FILE} beside the shards or one folder up, the folder names, or the CSV's "
                          "labels); class folders are matched to these names by name")
    zeroshot.add_argument("--templates", help="a file with one template per line ({} or {c} where the class "
                          "name goes) or a built-in set (simple, or a modality's own: photo, audio, video); default: "
                          f"{TEMPLATES_FILE} beside the dataset or one folder up, else the modality's built-in set")
    zeroshot.add_argument("--label-col", help="CSV column with the label (default: label / class / cls)")
    zeroshot.add_argument("--confusion-matrix", metavar="PNG", help="also draw the confusion matrix here")
    zeroshot.add_argument("--no-cache", action="store_true",
                          help="rebuild the text classifier even if this model, class names and templates "
                               "were seen before")
    _add_eval_io_args(zeroshot)
    zeroshot.set_defaults(func=cmd_eval_zeroshot)

    retrieval = evaluate.add_parser("retrieval", help="image-text (or audio-text, ...) retrieval recall@k")
    _add_model_args(retrieval)
    _add_dataset_arg(retrieval, "shards whose txt member holds one caption per line (or a JSON list), a "
                                "CLIP_benchmark retrieval folder, or a CSV of path,caption (a path on several "
                                "rows has several captions)")
    retrieval.add_argument("--caption-col", help="CSV column with the caption (default: caption / text)")
    _add_eval_io_args(retrieval)
    retrieval.set_defaults(func=cmd_eval_retrieval)

    knn = evaluate.add_parser("knn", help="weighted k-NN classification on frozen features (DINO's), with "
                              "all the training labels or a few per class (--shots)")
    _add_labelled_args(knn, "the labelled samples whose features vote")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (default: 20, DINO's)")
    knn.add_argument("--temperature", type=float, default=0.07,
                     help="a neighbour's vote is exp(cosine / temperature) (default: 0.07, DINO's)")
    knn.set_defaults(func=cmd_eval_knn)

    probe = evaluate.add_parser("linear-probe", help="logistic regression on frozen features by CLIP_benchmark's "
                                "protocol (weight-decay sweep on a validation split), with all labels or --shots")
    _add_labelled_args(probe, "the labelled samples the probe learns from")
    probe.add_argument("--val-dataset", help="labelled samples that choose the weight decay (default: "
                       "--val-proportion of --train-dataset, held out)")
    probe.add_argument("--val-split", default="val", help="with a CLIP_benchmark dataset folder, the split of "
                       "--val-dataset to read (default: val)")
    probe.add_argument("--val-proportion", type=float, default=0.2, help="without --val-dataset, the share of "
                       "--train-dataset held out to choose the weight decay; 0: no sweep, no decay (default: 0.2)")
    probe.add_argument("--lr", type=float, default=0.1, help="AdamW learning rate (default: 0.1, CLIP_benchmark's)")
    probe.add_argument("--epochs", type=int, default=10, help="passes over the features per probe (default: 10)")
    probe.add_argument("--probe-batch-size", type=int, default=64, help="features per probe step (default: 64)")
    probe.set_defaults(func=cmd_eval_linear_probe)

    embed = sub.add_parser("embed", help="embed one modality of shards or a folder of files for `clipkit index build`")
    _add_model_args(embed)
    embed.add_argument("--dataset", required=True,
                       help="shards (brace pattern or folder of .tar) or a folder of files (sidecar .txt captions)")
    embed.add_argument("--out", required=True,
                       help="embeddings folder; parts already there are kept and new ones added")
    embed.add_argument("--modality", default="image", help="the modality to embed (default: image)")
    embed.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default: 256)")
    embed.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                       help="data-loader workers decoding samples, per rank (default: 4, or the CPU count if "
                            "less; 0 decodes in the main process). Under torchrun (`torchrun --nproc_per_node=N -m clipkit.embed ...`) the "
                            "ranks share the parts")
    _add_progress_arg(embed)
    embed.set_defaults(func=cmd_embed)
    add_index_commands(sub)

    export = sub.add_parser("export-open-clip", help="write a clipkit checkpoint as an open_clip model folder")
    export.add_argument("checkpoint", help="a clipkit checkpoint (final.pt or step-N.pt)")
    export.add_argument("out", help="output folder (open_clip_config.json + open_clip_model.safetensors)")
    export.set_defaults(func=cmd_export_open_clip)

    wise = sub.add_parser("wise-ft", help="weight-space ensembles (WiSE-FT) of a fine-tuned model and its "
                          "original at several alphas, each written and evaluated zero-shot")
    wise.add_argument("finetuned", help="the fine-tuned clipkit checkpoint (final.pt)")
    wise.add_argument("original", help="the model it started from: a clipkit checkpoint, or for a fine-tuned "
                      "open_clip model its open_clip weights (a file, a cached zoo tag or local-dir:FOLDER)")
    wise.add_argument("--alphas", default="0,0.5,1", help="weights of the fine-tuned model, comma-separated "
                      "(0: the original, 1: the fine-tuned; default: 0,0.5,1)")
    wise.add_argument("--out", help="folder for the checkpoints (default: wise-ft/ beside FINETUNED)")
    wise.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when there is one)")
    _add_dataset_arg(wise, "zero-shot classification data, as `clipkit eval zeroshot --dataset` takes it")
    wise.add_argument("--classnames", help="one class name per line (default: as `clipkit eval zeroshot`)")
    wise.add_argument("--templates", help="a templates file or built-in set (default: as `clipkit eval zeroshot`)")
    wise.add_argument("--batch-size", type=int, default=256, help="samples per forward pass (default: 256)")
    _add_progress_arg(wise)
    wise.set_defaults(func=cmd_wise_ft)

    quick = sub.add_parser("quickstart", help="offline end-to-end demo on toy data (CPU, minutes)")
    _add_config_args(quick, default=QUICKSTART_CONFIG)
    quick.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where the toy shards are kept")
    quick.add_argument("--num-train", type=int, help="training samples (default: the modality's toy size)")
    quick.add_argument("--num-eval", type=int, help="held-out samples (default: the modality's toy size)")
    _add_progress_arg(quick)
    quick.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it picked is noise here
    for handler in logging.getLogger().handlers:  # open_clip logs its routine steps at INFO on the root logger
        handler.addFilter(lambda record: record.levelno > logging.INFO or "open_clip" not in record.pathname)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:
        print(f"clipkit: config error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PretrainedWeightsError) as err:  # the message names the missing file
        print(f"clipkit: {err}", file=sys.stderr)
        return 1
    except InterruptedError as err:
        print(f"clipkit: {err}", file=sys.stderr)
        return 130
    except (ValueError, ClipkitError) as err:  # bad input: class names that do not match, a wrong column, ...
        print(f"clipkit: {args.command}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
