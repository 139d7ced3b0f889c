"""Hugging Face models through graphrunner, as a new user writes the step: a closure or lambda over the model.

Tiny random-weight configs built here (no downloads), float32 so that graph, eager and HF's generate agree
token for token. Needs a GPU and transformers >= 5 (StaticCache(config=, max_cache_len=), whose layers count
positions on the device); skips with the reason elsewhere. The worked example is docs/huggingface.md.
"""
import pytest
import torch

import graphrunner as gr
from conftest import HAS_GPU

try:
    import transformers
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              StaticCache)
    HF_REASON = "" if int(transformers.__version__.split(".")[0]) >= 5 else \
        f"needs transformers >= 5 (StaticCache(config=, max_cache_len=)), found {transformers.__version__}"
except ImportError:
    HF_REASON = "needs transformers (pip install transformers); it is not installed here"

pytestmark = [pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU (this machine has none; CI never has one)"),
              pytest.mark.skipif(bool(HF_REASON), reason=HF_REASON or "-")]

VOCAB, SEQ = 1000, 16


def llama_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


def build(kind):
    """A tiny random-weight model in eval mode on the GPU, and a lambda over it, as a user writes the step."""
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(llama_config())
        step = lambda input_ids: model(input_ids=input_ids, use_cache=False).logits  # noqa: E731
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4, n_positions=64))
        step = lambda input_ids: model(input_ids=input_ids, use_cache=False).logits  # noqa: E731
    else:
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=64))
        step = lambda input_ids: model(input_ids=input_ids).last_hidden_state  # noqa: E731
    return model.cuda().eval(), step


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_a_lambda_over_a_hugging_face_model_passes_validate_with_scrub_and_guard(kind):
    model, step = build(kind)
    runner = gr.GraphRunner(step, {"input_ids": gr.StaticInput((SEQ,), torch.long, high=VOCAB)},
                            capture_sizes=[1, 2, 4, 8])
    try:
        runner.capture()
        assert not runner.audit().borrowed, str(runner.audit())
        runner.validate(scrub=True, guard=True)
        ids = torch.randint(0, VOCAB, (3, SEQ), device="cuda")
        with torch.no_grad():
            want = step(ids)
        torch.testing.assert_close(runner(input_ids=ids), want, rtol=1e-4, atol=1e-4)
    finally:
        runner.close()


def test_a_closure_over_the_model_that_also_reads_a_tensor_it_does_not_hold_names_that_tensor():
    """The model's weights count as kept alive; a tensor reached only through a weak reference does not, and
    the message's fix (keep=) clears it."""
    import weakref

    model, _ = build("llama")
    scale = torch.full((VOCAB,), 0.5, device="cuda")
    ref = weakref.ref(scale)

    def step(input_ids):
        return model(input_ids=input_ids, use_cache=False).logits * ref()

    inputs = {"input_ids": gr.StaticInput((SEQ,), torch.long, high=VOCAB)}
    with gr.GraphRunner(step, inputs, capture_sizes=[1, 2]) as runner:
        runner.capture()
        report = runner.audit()
        assert {r.memory.split("(block ")[-1] for r in report.borrowed} == {f"0x{scale.data_ptr():x})"}, str(report)
        with pytest.raises(gr.GraphHazardError, match=r"uses memory nothing keeps alive.*keep=\[tensor or module"):
            runner.validate()
    with gr.GraphRunner(step, inputs, capture_sizes=[1, 2], keep=[scale]) as runner:
        runner.capture()
        runner.validate(scrub=True, guard=True)


def greedy_setup():
    torch.manual_seed(0)
    cfg = llama_config()
    model = LlamaForCausalLM(cfg).cuda().eval()
    prompt = torch.randint(1, VOCAB, (4, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    return cfg, model, prompt


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-step", "torch-compile-step"])
def test_static_cache_greedy_decoding_equals_generate(compiled):
    """docs/huggingface.md's example: capture and validate on the StaticCache, reset it, prefill eagerly, decode
    through the graph. In float32 the tokens equal generate(cache_implementation="static") exactly, also with
    torch.compile(step) inside the graph (bf16 fusions may flip near-tied tokens; float32 keeps them)."""
    cfg, model, prompt = greedy_setup()
    batch, length, new = prompt.shape[0], prompt.shape[1], 16
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                          cache_implementation="static", disable_compile=True, pad_token_id=0)[:, length:]

    cache = StaticCache(config=cfg, max_cache_len=length + new + 8)
    # Made before the runner, so that its tensors are the runner's state (validate(restore_state=True)).
    cache.early_initialization(batch_size=batch, num_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                               dtype=torch.float32, device=torch.device("cuda"))

    def step(input_ids, position_ids):
        out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    counter = cache.layers[0].cumulative_length
    runner = gr.GraphRunner(torch.compile(step) if compiled else step,
                            {"input_ids": gr.StaticInput((1,), torch.long, high=VOCAB),
                             "position_ids": gr.StaticInput((1,), torch.long, high=length + new)},
                            capture_sizes=[batch])  # the cache holds `batch` rows: one graph, smaller batches pad
    try:
        runner.capture()
        assert counter.item() == 1  # the warm-up ran the step once: the cache's position counter moved
        assert any(".layers[0].keys" in name for name in runner.record.state_buffers)
        report = runner.validate(scrub=True, guard=True, eager_at="size", restore_state=True)
        assert counter.item() == 1 + report.replays  # each checked step advanced it once (restored after eager)

        cache.reset()  # zeroes keys, values and counters in place: the graph's addresses stay valid
        assert counter.item() == 0
        with torch.no_grad():
            token = model(input_ids=prompt, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        got = [token]
        for i in range(new - 1):
            position = torch.full((batch, 1), length + i, device="cuda")
            got.append(runner(input_ids=got[-1], position_ids=position).clone())
        got = torch.cat(got, dim=1)
        assert torch.equal(got, want), f"graph tokens {got.tolist()}\ngenerate's {want.tolist()}"
    finally:
        runner.close()
