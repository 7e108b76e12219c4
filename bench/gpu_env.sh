# Sourced (never run) by the GPU scripts, bench/gpu_checks.sh and bench/gpu_session.sh, from the repository root
# on a fresh GPU machine without a package registry: installs the carried wheels (.whl/*.whl) into /tmp/site,
# puts them and the repository on PYTHONPATH, and writes what the machine has (GPU, CPUs, the versions of the
# packages the GPU path needs) to $OUT/env.log and the terminal. Needs $PY and $OUT.
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1 \
    || { echo "wheel install failed:"; tail -5 /tmp/pip.log; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1
  echo "cpus: $(nproc)"
  $PY - <<'EOF'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.cuda.is_available())
for name in ("open_clip", "webdataset", "pydantic", "nvidia.nvimgcodec"):
    try:
        module = __import__(name, fromlist=["_"])
        print(name, getattr(module, "__version__", "ok"))
    except Exception as err:
        print(name, "NOT AVAILABLE:", type(err).__name__, err)
EOF
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log"
