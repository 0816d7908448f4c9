#!/bin/bash
# How the lent GPU machine runs a batch of bench scripts in one device call (see bench/results/README.md):
#   run(command="bash bench/gpu_run.sh \"name:seconds:python bench/x.py --out \\$OUT\" ...", carry=[".whl"])
# where .whl/ (gitignored) holds the wheels the GPU machine lacks (pydantic, ruff, liger_kernel, fla, the mamba_ssm sdist).
# usage (repo root, on the GPU machine): bash bench/gpu_run.sh "name:seconds:command" ...
# The device returns only a handful of files: after each job its folder is appended to $OUT/results.tar and removed,
# so a call cut short still returns every finished job.
set -u
ROOT_OUT=$OUT
export PYTHONPATH=/tmp/site:$PWD
export PATH=/tmp/site/bin:$PATH
mkdir -p $ROOT_OUT/setup
if [ ! -d /tmp/site ]; then
  pip install -q --no-deps --target /tmp/site .whl/*.whl > $ROOT_OUT/setup/pip.log 2>&1 || echo "pip failed" >> $ROOT_OUT/summary.txt
fi
nvidia-smi --query-gpu=index,name,memory.used --format=csv > $ROOT_OUT/setup/nvidia.txt 2>&1
(cd $ROOT_OUT && tar rf results.tar setup && rm -rf setup)
for job in "$@"; do
  name=${job%%:*}; rest=${job#*:}; secs=${rest%%:*}; cmd=${rest#*:}
  mkdir -p $ROOT_OUT/$name
  start=$(date +%s)
  OUT=$ROOT_OUT/$name timeout -k 5 $secs bash -c "$cmd" > $ROOT_OUT/$name/log.txt 2>&1 < /dev/null
  rc=$?
  echo "$name rc=$rc $(( $(date +%s)-start ))s" | tee -a $ROOT_OUT/summary.txt
  (cd $ROOT_OUT && tar rf results.tar $name && rm -rf $name)
done
