#!/usr/bin/env bash
# Builds what benchmarks/gpu_check.py needs on a GPU machine without internet or PyPI, from this
# machine's model cache, dataset mirror and PyPI access. Both folders are ignored by git.
#
#   .gpu-assets/model/  SmolLM2-135M's config, generation config and tokenizer (no weights: the
#                       check builds random ones from the config)
#   .gpu-assets/data/   the dataset mirror files the check reads (FPB, WikiText-2 validation)
#   .whl/               wheels for CPython 3.12 / manylinux x86_64 of what taxon imports on the checked
#                       paths and a torch + transformers + peft + accelerate image usually lacks
#
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   python3 benchmarks/gpu_check.py --assets .gpu-assets --out gpu_check.json
#
# Environment: PY (a Python with taxon importable and pip; default .venv/bin/python),
# TAXON_DATA_DIR (the mirror; default ../shared/data), WHEELS (extra NAME==VERSION specs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${TAXON_DATA_DIR:-../shared/data}

# Versions from constraints.txt (all accept torch 2.11). transformers, peft, typing_extensions and
# fsspec are carried although an image may have them, so that the versions taxon is tested with are the
# ones imported: train.py passes SFTConfig(activation_checkpointing=...), which transformers 5.17's
# TrainingArguments does not know; pydantic and datasets need newer or bounded versions.
PACKAGES=(transformers trl datasets dill multiprocess pydantic pydantic_core annotated-types
          typing-inspection typing_extensions platformdirs fsspec peft)
# huggingface_hub: the last 1.x, which transformers 5.23 and datasets 5.2 accept; the 2.x of
# constraints.txt would also need httpx2, which an image with hub 1.x lacks.
PINNED=(huggingface_hub==1.33.0)

pin() {  # NAME -> NAME==VERSION from constraints.txt (names compared with - and _ alike)
    local want=${1//_/-}
    local line
    line=$(sed 's/_/-/g' constraints.txt | grep -i "^${want}==" || true)
    [[ -n $line ]] || { echo "gpu_assets: $1 is not pinned in constraints.txt" >&2; exit 2; }
    echo "$line"
}

rm -rf .whl .gpu-assets
mkdir -p .whl .gpu-assets/model .gpu-assets/data

model=$(PYTHONPATH=$PWD/src "$PY" -c 'from taxon.models import prepare; print(prepare("smollm2-135m"))')
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [[ -f $model/$f ]] && cp "$model/$f" .gpu-assets/model/
done
for f in takala/financial_phrasebank/sentences_50agree/train.jsonl \
         Salesforce/wikitext/wikitext-2-v1/validation.jsonl; do
    mkdir -p ".gpu-assets/data/$(dirname "$f")"
    cp "$DATA/$f" ".gpu-assets/data/$f"
done

specs=()
for p in "${PACKAGES[@]}"; do specs+=("$(pin "$p")"); done
specs+=("${PINNED[@]}")
# shellcheck disable=SC2206
specs+=(${WHEELS:-})
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}"

du -sh .whl .gpu-assets
ls .whl
