#!/usr/bin/env bash
# One prepared check for a GPU session (issue 17): ResNet-50-FPN, five heads, 800 px, bf16
# (configs/gpu_r50_fpn.yaml) on synthetic 800 px shards this script makes, then one table:
#   images/s per GPU: DDP (num_workers auto, and 1; channels_last) and ZeRO-2
#   time/data_wait_frac at num_workers auto and 1
#   trainer step / bare loop (bench.step_overhead, R50 at 800 px, bf16)
#   balancer step ratios: equal, famo, pcgrad at statistics features and fpn (bench.balancing_speed)
#   host syncs per train step, and where polytask makes them (bench.host_syncs; list in host_syncs.txt)
#   checkpoint save / torch.save (bench.checkpoint_save: its fixed demo model, on the GPU)
#   peak GPU memory (DDP, ZeRO-2)
# Budget: under 8 minutes on one H100, by estimate, not yet measured (about 1 min of shards,
# 4 short training runs in one process, then the three benches).
#
#   bench/gpu_check.sh [--out DIR] [--nproc N]    # on a GPU machine (N: GPUs, default all)
#   bench/gpu_check.sh --dry-run [--out DIR]      # the same steps, tiny, on CPU (gloo): resnet18,
#                                                 # 64 px, a few steps; checks the plumbing, not speed
# Each step writes DIR/<step>.txt and DIR/<step>.log; the training runs are under DIR/runs/.
set -euo pipefail

usage() { sed -n '2,16p' "$0"; }

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
dry_run=0
out=""
nproc=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --out) out="$2"; shift ;;
    --nproc) nproc="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$out" ]]; then
  out=$(mktemp -d -t polytask_gpu_check.XXXXXX)
fi
mkdir -p "$out"
export WANDB_SILENT=true TQDM_DISABLE=1

if ((dry_run)); then
  nproc=${nproc:-1}
  image_size=64; images=8; steps=4; log_every=2
  # The 800 px R50 recipe shrunk to run in seconds on a CPU; the code paths are the same.
  tiny=(model.fpn_channels=64 model.semantic_channels=64 model.fcos_num_convs=1 model.mask_head_convs=1
        model.keypoint_head_convs=1 data.transforms.image_size=64)
  model=(trainer.device=cpu trainer.precision=fp32 model.backbone=resnet18 data.batch_size=2
         data.readers_per_rank=4 "${tiny[@]}")
  bench_model=("${tiny[@]}")  # the demo's resnet18 (group norm: no trunk weights)
  bench_device=cpu; bench_precision=fp32
  overhead_args=(--steps 2 --rounds 1 --threads 1)
  balancing_args=(--steps 1 --rounds 1 --threads 1)
  checkpoint_args=(--repeats 1)
  sync_args=(--steps 1 --warmup 1)
  export OMP_NUM_THREADS=1
else
  nproc=${nproc:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
  image_size=800; images=64; steps=60; log_every=20
  model=()
  bench_model=(model.backbone=resnet50 model.fpn_channels=256 model.backbone_norm=frozen_bn
               model.trainable_backbone_layers=3 data.transforms.image_size=800 data.batch_size=8)
  bench_device=cuda; bench_precision=bf16
  overhead_args=(--steps 10 --rounds 3 --threads 4)
  balancing_args=(--steps 4 --rounds 3 --threads 4)
  checkpoint_args=(--repeats 3)
  sync_args=(--steps 4 --warmup 2)
fi
weights="$out/trunk_weights.pth"  # calibrated random trunk (bench/throughput.py), written by the first run
if ((!dry_run)); then
  bench_model+=("model.backbone_weights=$weights")
fi

# Each step's output goes to $out/<name>.txt, its log to $out/<name>.log. A failed step is
# reported and the others still run: one GPU session should bring back every figure it can
# (the table marks what is missing and the script then exits 1).
failed=()
step() {
  local name=$1
  shift
  echo "== [${SECONDS}s] $name" >&2
  if ! "$@" > "$out/$name.txt" 2> "$out/$name.log"; then
    echo "!! $name failed; the end of $out/$name.log:" >&2
    tail -n 15 "$out/$name.log" >&2
    failed+=("$name")
  fi
}

echo "== [${SECONDS}s] synthetic ${image_size} px shards ($images images per source) -> $out/data" >&2
mapfile -t sources < <("$PY" -m bench.gpu_check_inputs --out "$out/data" --image-size "$image_size" --images "$images")
if ((${#sources[@]} != 4)); then
  echo "gpu_check.sh: bench.gpu_check_inputs did not make the 4 sources (got ${#sources[@]})" >&2
  exit 1
fi
source_overrides=()
for i in "${!sources[@]}"; do
  source_overrides+=("data.sources.$i.path=${sources[$i]}")
done

# Training throughput, $steps steps per variant (DDP: workers auto, 1, channels_last; ZeRO-2), in
# one process per rank. torchrun even for one rank: DeepSpeed wants its environment, and it
# is how jobs start. A skipped (non-finite) step costs the same time, so many are allowed.
step throughput "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m bench.throughput \
  --config configs/gpu_r50_fpn.yaml --out "$out/runs" --steps "$steps" --log-every "$log_every" \
  --calibrated-weights "$weights" --set "${source_overrides[@]}" "${model[@]}" trainer.max_bad_steps=1000000 \
  --variant ddp \
  --variant ddp_workers1 data.num_workers=1 \
  --variant ddp_channels_last model.channels_last=true \
  --variant zero2 trainer.backend=deepspeed trainer.deepspeed.zero_stage=2 checkpoint.async_save=false

if [[ ! -f "$weights" ]]; then  # the benches below train from it on the GPU
  bench_model=("${bench_model[@]/model.backbone_weights=*/model.backbone_norm=group_norm}")
fi
step step_overhead "$PY" -m bench.step_overhead --device "$bench_device" --precision "$bench_precision" \
  "${overhead_args[@]}" --set "${bench_model[@]}" trainer.max_bad_steps=1000000
step balancing_speed "$PY" -m bench.balancing_speed --device "$bench_device" "${balancing_args[@]}" \
  --methods equal famo pcgrad --statistics features fpn \
  --set "${bench_model[@]}" "trainer.precision=$bench_precision" trainer.max_bad_steps=1000000
step host_syncs "$PY" -m bench.host_syncs --device "$bench_device" "${sync_args[@]}" \
  --set "${bench_model[@]}" "trainer.precision=$bench_precision" trainer.max_bad_steps=1000000
step checkpoint_save "$PY" -m bench.checkpoint_save --device "$bench_device" "${checkpoint_args[@]}" --dir "$out"

echo "== [${SECONDS}s] done" >&2
if ((dry_run)); then
  where="DRY RUN, CPU, tiny"
else
  where=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo "GPU")
fi
table_status=0
"$PY" -m bench.gpu_check_table --dir "$out" --title "polytask GPU check ($where, $nproc rank(s), outputs in $out)" \
  || table_status=$?
if ((${#failed[@]})); then
  echo "failed steps: ${failed[*]} (logs in $out)" >&2
  exit 1
fi
exit "$table_status"
