#!/usr/bin/env bash
# Regenerate the embedded traces in data/traces/ from the public files (see README.md and NOTICE here).
# Usage: bash data/traces/regenerate.sh [PUBLIC_TRACES_DIR]   (default: ../shared/data/public-traces)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/data/public-traces}"
K_NOTE="The engine ran with top-k overridden to 6, below the model default of 8: routings of a reduced-k variant; router choices are real. Prompt: 'Explain how a mixture-of-experts model decides which experts handle each token.'"
python -m traces.import bigmoeonedge "$SRC/bigmoeonedge/qwen3-30b-a3b.route.csv" data/traces/qwen3-30b-a3b --overwrite \
  --model "Qwen3-30B-A3B (GGUF Q4_K_M, top-k 6)" --capture-note "$K_NOTE"
python -m traces.import bigmoeonedge "$SRC/bigmoeonedge/gemma-4-26b-a4b.route.csv" data/traces/gemma-4-26b-a4b --overwrite \
  --model "Gemma-4-26B-A4B-it (GGUF Q4_K_M, top-k 6)" --capture-note "$K_NOTE"
python -m traces.import flame "$SRC/flame-moe-290m/encoder_32x64" data/traces/flame-moe-290m-encoder --overwrite \
  --capture-note "Sample encoder_32x64: 2048 consecutive tokens of one stream; sequences and positions follow the files' own num_sequences=32 x sequence_length=64. Rows 0, 8, 16 and 24 carry the same tokens and routing as decoder sequences 0..3, and equal tokens at position 0 of different rows route differently, so the 64-token rows were not separate model contexts (the model saw longer contexts); positions are offsets within the files' 64-token rows."
python -m traces.import flame "$SRC/flame-moe-290m/decoder_64seq_pos0-9" data/traces/flame-moe-290m-decoder --overwrite \
  --capture-note "Sample decoder_64seq_pos0-9 (files 'firstTokens_64x512'): positions 0..9 of 64 sequences of 512 tokens, one file per (layer, position) in folders 1st..10th; the tokens are training text, so the phase is teacher_forced although the folder says decoder. Sequences 0..3 are the same tokens and routing as rows 0, 8, 16, 24 of encoder_32x64. Position 0 is not a fresh context (equal tokens at position 0 route differently)."
for t in qwen3-30b-a3b gemma-4-26b-a4b flame-moe-290m-encoder flame-moe-290m-decoder; do
  python -m traces.check "data/traces/$t"
done
