#!/usr/bin/env bash
# GPU check, one command on a CUDA machine (under 8 minutes on one H100/H200):
#
#   benchmarks/gpu_check.sh            # needs CUDA
#   benchmarks/gpu_check.sh --dry-run  # the same steps on CPU, tiny sizes: checks the script
#
# 1. pretraining throughput at RoBERTa-large shape in bf16: ours vs the original-style path
#    (benchmarks/pretrain_throughput.py: real tokens/s, ratio, achieved GFLOP/s, MFU against
#    989 TFLOP/s dense bf16, the measured matmul rate, peak GPU memory);
# 2. a short bf16 run of the sample pipeline on CUDA: the sample data stages, pretraining of
#    fac and lin, fine-tuning TACRED with both adapters, LAMA with every variant, each with
#    bf16 autocast (--bf16 true) beside a bf16 frozen encoder.
# Everything goes under runs/bench/gpu_check/; the summary, with every figure and check, to
# runs/bench/gpu_check.json. Exit status 1 when a check fails (a precision that did not
# apply, a device that is not CUDA, a non-finite metric); the throughput targets (ratio >= 3,
# MFU >= 50%) are reported, not enforced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac

WORK=runs/bench/gpu_check
SUMMARY=runs/bench/gpu_check.json
rm -rf "$WORK"
mkdir -p "$WORK"
: > "$WORK/stages.tsv"

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  THROUGHPUT=(--shape base --steps 1 --warmup 0 --batch-size 8 --device cpu)
  STEPS=(--max_steps 2)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
  DEVICE=cuda
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); on CPU use --dry-run" >&2
    exit 2
  fi
  THROUGHPUT=(--shape large --steps 30 --warmup 3 --batch-size 128 --device cuda)
  STEPS=(--max_steps 60)
fi
BF16=(--model.encoder_dtype bfloat16)   # the CUDA default, spelt out so that --dry-run matches
SAMPLE=(--config configs/sample.yaml)

stage() {  # stage NAME COMMAND...: run, time, record its exit status; a failure stops no other
  local name=$1; shift
  echo "== $name: $*"
  local started status=0
  started=$(date +%s%N)
  "$@" || status=$?
  printf '%s\t%s\t%s\n' "$name" "$(( ($(date +%s%N) - started) / 1000000 ))" "$status" \
    >> "$WORK/stages.tsv"
}

stage throughput "$PY" benchmarks/pretrain_throughput.py "${THROUGHPUT[@]}" --out "$WORK/throughput.json"
stage data_trex "$PY" -m pipelines.data_trex "${SAMPLE[@]}" --output_dir "$WORK/trex_rc"
stage data_deps "$PY" -m pipelines.data_deps "${SAMPLE[@]}" --output_dir "$WORK/deps"
for task in fac lin; do
  data=$([ "$task" = fac ] && echo trex_rc || echo deps)
  stage "pretrain_$task" "$PY" -m pipelines.pretrain "${SAMPLE[@]}" --task "$task" "${BF16[@]}" \
    --bf16 true "${STEPS[@]}" --save_every 0 --data_dir "$WORK/$data" \
    --output_dir "$WORK/$task-adapter" --cache_dir "$WORK/features"
done
stage finetune_tacred "$PY" -m pipelines.finetune "${SAMPLE[@]}" --task tacred --adapters fac,lin \
  "${BF16[@]}" --bf16 true --finetune.tacred.max_steps "${STEPS[1]}" \
  --fac_adapter "$WORK/fac-adapter" --lin_adapter "$WORK/lin-adapter" --output_dir "$WORK/finetune"
stage eval_lama "$PY" -m pipelines.eval_lama "${SAMPLE[@]}" "${BF16[@]}" --mlm_head.bf16 true \
  --mlm_head.max_steps "${STEPS[1]}" --fac_adapter "$WORK/fac-adapter" \
  --lin_adapter "$WORK/lin-adapter" --output_dir "$WORK/lama"

"$PY" - "$WORK" "$SUMMARY" "$DEVICE" "$DRY" <<'EOF'
import json
import math
import sys
from pathlib import Path

from kadapter.io import atomic_write_json, versions

work, summary_path, device, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
checks, stages, seconds, exit_status = {}, {}, {}, {}
for line in (work / "stages.tsv").read_text().splitlines():
    name, value, status = line.split("\t")
    seconds[name], exit_status[name] = round(int(value) / 1000, 1), int(status)  # ms -> s
    checks[f"{name}_exit_0"] = status == "0"


def read(path):
    return json.loads((work / path).read_text())


def finite(values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def section(name, body):
    """Fill stages[name] and its checks from the stage's outputs; missing outputs fail."""
    try:
        body()
    except (OSError, KeyError, ValueError) as err:
        stages[name] = {"error": f"{type(err).__name__}: {err}"}
        checks[f"{name}_outputs"] = False


throughput = {}


def read_throughput():
    (result,) = read("throughput.json")
    throughput.update(result)


def read_pretrain(task):
    manifest = read(f"{task}-adapter/manifest.json")
    training = manifest["training"]
    stages[f"pretrain_{task}"] = {
        "device": training["device"], "mixed_precision": training["mixed_precision"],
        "precision": training.get("precision"), "encoder_dtype": training.get("encoder_dtype"),
        "steps": training["steps"], "tokens_per_s": training["tokens_per_s"],
        "dev_metrics": manifest["dev_metrics"]}
    checks[f"pretrain_{task}_bf16"] = training["mixed_precision"] == "bf16"
    checks[f"pretrain_{task}_on_{device}"] = training["device"].startswith(device)
    checks[f"pretrain_{task}_finite"] = finite(manifest["dev_metrics"].values())


def read_finetune():
    run = Path("finetune", "tacred", "fac+lin")
    manifest, metrics = read(run / "manifest.json"), read(run / "metrics.json")
    precision = manifest["parameters"].get("precision") or {}
    stages["finetune_tacred"] = {"precision": precision, "steps": metrics["steps"],
                                 "dev": metrics["dev"], "test": metrics["test"],
                                 "tokens_per_s": manifest["training"]["tokens_per_s"]}
    checks["finetune_bf16"] = precision.get("mixed_precision") == "bf16"
    checks["finetune_finite"] = finite(metrics["dev"].values())


def read_lama():
    results, manifest = read("lama/results.json"), read("lama/manifest.json")
    parameters = manifest["parameters"]
    p_at_1 = {subset: {variant: scores["p@1"] for variant, scores in variants.items()}
              for subset, variants in results["subsets"].items()}
    stages["eval_lama"] = {"device": parameters["device"], "precision": parameters.get("precision"),
                           "p_at_1": p_at_1, "mlm_head": results["mlm_head"]}
    checks["lama_bf16"] = (parameters.get("precision") or {}).get("mixed_precision") == "bf16"
    checks[f"lama_on_{device}"] = parameters["device"].startswith(device)
    checks["lama_every_variant"] = all(set(v) == {"encoder", "fac", "lin", "fac+lin"}
                                       for v in p_at_1.values())
    checks["lama_finite"] = all(finite(v.values()) for v in p_at_1.values()) and finite(
        (results["mlm_head"].get("dev_mlm_loss") or {}).values())


section("throughput", read_throughput)
section("pretrain_fac", lambda: read_pretrain("fac"))
section("pretrain_lin", lambda: read_pretrain("lin"))
section("finetune_tacred", read_finetune)
section("eval_lama", read_lama)

mfu = throughput.get("mfu")
summary = {
    "dry_run": dry, "device": throughput.get("device"),
    "throughput": throughput,
    "targets": {"ratio_at_least_3": throughput["ratio"] >= 3.0 if throughput else None,
                "mfu_at_least_50_percent": None if mfu is None else mfu >= 0.5},
    "pipeline": stages, "checks": checks, "all_checks_pass": all(checks.values()),
    "stage_seconds": seconds, "stage_exit_status": exit_status,
    "total_seconds": round(sum(seconds.values()), 1), "versions": versions(),
}
atomic_write_json(summary_path, summary)
if throughput:
    print(f"throughput {throughput['shape']} on {throughput['device']}: ours "
          f"{throughput['ours_tokens_per_s']:,.0f} vs original-style "
          f"{throughput['baseline_tokens_per_s']:,.0f} real tokens/s ({throughput['ratio']:.2f}x); "
          f"MFU {'n/a' if mfu is None else format(mfu, '.1%')}; "
          f"{throughput['ours_fraction_of_matmul']:.1%} of the measured matmul rate; "
          f"peak GPU memory {throughput['peak_gpu_memory_gb']} GB")
for name, ok in checks.items():
    print(f"{'ok  ' if ok else 'FAIL'} {name}")
print(f"stages {seconds}; total {summary['total_seconds']} s -> {summary_path}")
sys.exit(0 if summary["all_checks_pass"] else 1)
EOF
