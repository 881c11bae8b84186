# The GPU fit settings of the small MoE's learned predictors (predictors.train --set ...), shared by
# traces/small_moe/device_predictors.sh and executor/device_run.sh (the live ProMoE label's learned_mlp); docs/
# predictors.md says how they were chosen (session 10: past_input and 50 epochs, the fit that reached 0.90 / 0.86). Sourced; a value already in the environment wins.
MLP_SETS=${MLP_SETS:-"--set batch_size=4096 --set lr=0.003 --set epochs=50 --set patience=6 --set schedule=cosine --set warmup=1 --set dropout=0.1 --set skip=true --set max_units=1536 --set max_rows=100000000 --set past_input=true"}
HIST_SETS=${HIST_SETS:-"--set batch_size=4096 --set lr=0.003 --set epochs=40 --set patience=6 --set schedule=cosine --set warmup=1"}
