"""``refound finetune``: train a task head (and, by default, the whole backbone) on a region
dataset and write a checkpoint that ``refound predict``, ``refound serve`` and the plugin load.

Resumable: while it trains, ``OUT.partial/`` holds the arguments and the state after the last
finished epoch. A killed run (Ctrl-C, SIGTERM, kill -9) is continued by the same command; the
folder is removed once the checkpoint is written. ``OUT`` itself appears only when complete.
"""
from __future__ import annotations

import argparse

from refound_core.data.validate import positive_float, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="pre-trained checkpoint folder (refound pretrain / convert-paddle)")
    p.add_argument("--data", required=True, help="region dataset folder (refound build-dataset) with the label")
    p.add_argument("--task", required=True,
                   help="urban_village, population, commercial, or any label column (refound add-label)")
    p.add_argument("--task-kind", choices=["binary", "regression", "multiclass"],
                   help="kind of a custom task (default: the kind stored by `refound add-label`)")
    p.add_argument("--label", help="label column of a custom task (default: the task name)")
    p.add_argument("--num-classes", type=int, help="classes of a multiclass custom task (default: from the dataset)")
    p.add_argument("--log-target", choices=["yes", "no"], help="train a regression on log1p(y) (default: yes for population/commercial)")
    p.add_argument("--mode", choices=["finetune", "linear"], default="finetune",
                   help="finetune: whole model + head (paper A.2.2); linear: frozen backbone, head only (feature-based, A.2.3)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default 30 finetune / 40 linear, paper Tables 5-6)")
    p.add_argument("--warmup-epochs", type=int, default=3, help="linear lr warm-up epochs before the linear decay (paper: 3)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default 1e-4 finetune / 5e-4 linear)")
    p.add_argument("--batch-size", type=positive_int, default=12, help="batch size (paper: 12)")
    p.add_argument("--fusion", choices=["average", "attention"], help="h[P]/h[S] fusion (default per task, paper Tables 5-6)")
    p.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay ratio (paper: 0.75)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split and of training")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", required=True,
                   help="output checkpoint folder (must not exist); a killed run left OUT.partial/, and the "
                        "same command resumes from its last finished epoch")
    p.add_argument("--restart", action="store_true",
                   help="discard OUT.partial/ of an earlier killed run and train from epoch 1")


# arguments that change what is trained: a resumed run must match them
_RESUME_KEYS = ("checkpoint", "data", "task", "task_kind", "label", "num_classes", "log_target", "mode",
                "epochs", "warmup_epochs", "lr", "batch_size", "fusion", "layer_decay", "seed")


def _resume_folder(args):
    """``OUT.partial``: created with the arguments, or an earlier one checked against them."""
    import json
    import shutil
    from pathlib import Path

    from refound_core.errors import InputError

    folder = Path(f"{args.out}.partial")
    wanted = {k: getattr(args, k, None) for k in _RESUME_KEYS}
    if folder.is_dir() and args.restart:
        shutil.rmtree(folder)
    if folder.is_dir():
        try:
            earlier = json.loads((folder / "args.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if earlier != wanted:
            diff = sorted(k for k in _RESUME_KEYS if (earlier or {}).get(k) != wanted[k]) if earlier else ["args.json"]
            raise InputError(f"{folder} holds a killed fine-tuning run with other settings ({', '.join(diff)} "
                             "differ); run the same command again to resume it, or pass --restart to start over")
        return folder, True
    folder.mkdir(parents=True)
    tmp = folder / ".args.json.tmp"
    tmp.write_text(json.dumps(wanted, indent=1), encoding="utf-8")
    tmp.replace(folder / "args.json")
    return folder, False


def run(args) -> int:
    from pathlib import Path

    from refound_core.data.dataset import RegionDataset
    from refound_core.data.validate import OutputLock
    from refound_core.errors import InputError

    if Path(args.out).exists():
        raise InputError(f"--out {args.out} already exists; choose a new folder (checkpoints are never overwritten)")
    if args.warmup_epochs < 0:
        raise InputError(f"--warmup-epochs must be 0 or more, got {args.warmup_epochs}")
    ds = RegionDataset(args.data)
    with OutputLock(args.out):
        return _run(args, ds)


def _run(args, ds) -> int:
    import shutil

    from refound_core.model.checkpoint import save_checkpoint
    from training.device import resolve_device
    from training.finetune.evaluate import make_split
    from training.finetune.methods import EvalContext, labels_of
    from training.finetune.metrics import task_metrics
    from training.finetune.refound_methods import ReFoundFT, ReFoundLinear
    from training.finetune.tasks import task_for_dataset

    log_target = None if args.log_target is None else args.log_target == "yes"
    task = task_for_dataset(args.task, ds, kind=args.task_kind, label=args.label, log_target=log_target,
                            num_classes=args.num_classes)
    device = resolve_device(args.device)
    linear = args.mode == "linear"
    epochs = args.epochs if args.epochs is not None else (40 if linear else 30)  # 0 is refused by the parser
    partial, resumed = _resume_folder(args)
    if resumed:
        print(f"resuming the killed run kept in {partial} (--restart starts over)")
    ctx = EvalContext(dataset=ds, checkpoint=args.checkpoint, device=device, epochs=epochs,
                      batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
                      options={"fusion": args.fusion, "layer_decay": args.layer_decay,
                               "feature_epochs": epochs, "log": print, "state_path": partial / "state.pt"})
    y = labels_of(ds, task)
    split = make_split(y, args.seed, kind=task.kind)
    print(f"{task.name} ({task.kind}) on {ds}: train/val/test {len(split.train)}/{len(split.val)}/{len(split.test)}, "
          f"{args.mode}, {epochs} epochs, device {device}")
    if linear:
        method = ReFoundLinear(ctx)
        result, head, scaler = method.train(task, split, args.seed)
        from refound_core.model.checkpoint import load_checkpoint
        loaded = load_checkpoint(args.checkpoint, with_head=False)
        backbone, fusion = loaded.model, head.fusion
    else:
        result, (model, loaded, fusion), scaler = ReFoundFT(ctx).train(task, split, args.seed)
        backbone, head = model.backbone, model.head
    test = task_metrics(task.kind, y[split.test], result.test_pred, y_val=y[split.val], val_pred=result.val_pred)
    print(f"best epoch {result.best_epoch + 1}; test " + " ".join(f"{k} {v:.4f}" for k, v in test.items()))
    meta = {**task.to_dict(), "mode": args.mode, "fusion": fusion, "target_scaler": scaler.to_dict(),
            "test_metrics": test, "best_epoch": result.best_epoch, "split_seed": args.seed,
            "classes": ds.label_info.get(task.label, {}).get("classes")}
    prov = {"base_checkpoint": str(args.checkpoint), "base_provenance": loaded.provenance,
            "training_data": {"folder": str(ds.folder), "provenance": ds.meta.get("provenance")},
            "teachers": (loaded.provenance or {}).get("teachers")}
    files = loaded.files
    extra = {k: v for k, v in files.items() if k not in ("tokenizer", "category_vocab", "codebook")}
    save_checkpoint(args.out, backbone.cpu(), head.cpu(), task=meta, tokenizer_dir=files.get("tokenizer"),
                    category_vocab=files.get("category_vocab"), extra_files=extra or None, provenance=prov)
    shutil.rmtree(partial, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0
