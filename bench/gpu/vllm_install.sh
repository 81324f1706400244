# On the GPU machine: join the carried vLLM wheel pieces (/root/vx/c*, one 52 MB piece per chained call; built
# here with ../shared/bench/gpu_wheels.py into .vwhl/, then `tar cf - -C .vwhl . | split -b 52000000 -d -a 1
# - .gx/c`) and install them once into /tmp/vsite; then PYTHONPATH=/tmp/vsite:$PWD VLLM_USE_FLASHINFER_SAMPLER=0.
# vLLM 0.24.0 pins apache-tvm-ffi 0.1.9, with which xgrammar 0.2.9 does not import: the project's 0.1.15
# (carried in .whl/) goes over it.
set -e
if [ ! -f /tmp/vsite/.ok ]; then
  mkdir -p /root/vwhl && cat /root/vx/c* | tar xf - -C /root/vwhl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vsite /root/vwhl/*.whl 2>&1 | tail -3
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vsite .whl/apache_tvm_ffi*.whl
  touch /tmp/vsite/.ok
fi
