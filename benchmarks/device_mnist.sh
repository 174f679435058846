#!/usr/bin/env bash
# The MNIST full protocol on the GPU machine (the `device` tool), end to end, wall time included.
#
# Here, before the call (../shared does not travel; .device_data/ is git-ignored):
#   mkdir -p .device_data && cp -r ../shared/data/mnist-idx-gz ../shared/data/fashion-idx-gz .device_data/
# Then: run(command="bash benchmarks/device_mnist.sh", carry=[".device_data"], timeout_s=420)
# The three MultiSWAG runs train in three processes at once (--workers 3): a run of this small
# model is bound by kernel launches and Python, so one alone leaves the GPU mostly idle.
# Extra arguments go to examples/mnist.py (e.g. --fast to check the script on a CPU first).
# After the timed protocol it runs the CUDA tests (tests/test_cuda.py) and the core tests with
# the device's own torch; set SKIP_DEVICE_TESTS=1 to leave them out.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/device}"
mkdir -p "$out" .device_data/MNIST/raw .device_data/FashionMNIST/raw
for pair in "mnist-idx-gz:MNIST" "fashion-idx-gz:FashionMNIST"; do
  src=".device_data/${pair%%:*}" dst=".device_data/${pair##*:}/raw"
  for f in "$src"/*.gz; do
    target="$dst/$(basename "${f%.gz}")"
    [ -f "$target" ] || gunzip -c "$f" > "$target"
  done
done
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
start=$(date +%s.%N)
PYTHONPATH=. python3 examples/mnist.py --data-dir .device_data --output-dir "$out" --pin-to-device --workers 3 "$@" 2>&1 | tee "$out/mnist_device.log"
end=$(date +%s.%N)
python3 -c "print(f'end-to-end wall time (process start to finish): {$end - $start:.1f} s')" | tee -a "$out/mnist_device.log"
if [ -z "${SKIP_DEVICE_TESTS:-}" ]; then
  python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/posterior/test_swag.py tests/lightning/test_module.py \
    tests/lightning/test_callback.py 2>&1 | tee "$out/device_tests.log"
fi
