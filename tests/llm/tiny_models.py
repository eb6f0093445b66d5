# ruff: noqa: RUF001  (the test texts use non-ASCII look-alike characters on purpose)
"""Tiny random checkpoints on disk, built with ``transformers`` and a locally trained tokenizer.

Used by the LLM-engine tests as stand-ins for real models: they have the exact on-disk layout of a
Hugging Face checkpoint (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json) but hidden size 64, 2 layers and a vocabulary of a few hundred tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

Arch = Literal["llama", "qwen2", "qwen3"]

BOS_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]

# ChatML with tools, in the style of Qwen/SmolLM templates; exercises loops, tojson, raise_exception.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'You may call these tools:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{%- if message['role'] == 'system' and loop.first %}{%- continue %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for call in message.tool_calls %}"
    "{{- '<tool_call>\\n' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
    "{{- '\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Training text: English, code, numbers, accents, CJK, emoji and ZWJ sequences, so the learnt merges
# glue multi-byte characters together and the tests see characters split across tokens.
TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Once upon a time, there was a small model that wanted to serve many requests at the same time.
It learnt to batch them, to cache their keys and values, and to stream tokens back one by one.
def generate(prompt: str, max_tokens: int = 16) -> str:
    return model.run(prompt, temperature=0.7, top_p=0.95)
for i in range(10): print(i * 2 + 1)  # 1 3 5 7 9 11 13 15 17 19
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 42
Café, naïve, façade, résumé, jalapeño, Straße, smörgåsbord, crème brûlée.
Привет, как дела? Всё хорошо, спасибо.
こんにちは世界。今日はいい天気ですね。日本語のテキストです。
你好，世界！我们正在测试分词器。中文字符和标点。
안녕하세요, 세계! 한국어 문장입니다.
Emoji: 😀 😃 😄 😁 🚀 🔥 ✨ 👍 🎉 ❤️ 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷 🇯🇵
Math: ∑ ∫ √ π ≈ ≠ ≤ ≥ → ← ∞ ± × ÷
"""


def train_bytelevel_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE (GPT-2 / SmolLM / Qwen style) trained on ``TRAINING_TEXT``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = TRAINING_TEXT.splitlines(keepends=True)
    tokenizer.train_from_iterator(lines * 3, trainer=trainer)
    return tokenizer


def train_sentencepiece_style_tokenizer(vocab_size: int = 500) -> Tokenizer:
    """A Llama-2-style BPE: ``▁`` for spaces, a prepended ``▁``, byte fallback ``<0xNN>`` tokens."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    # Keep only ASCII letters/punctuation in the base alphabet so accented, CJK and emoji text must
    # fall back to bytes.
    ascii_text = "".join(ch for ch in TRAINING_TEXT if ord(ch) < 128)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, limit_alphabet=200)
    base.train_from_iterator(ascii_text.splitlines(keepends=False) * 3, trainer=trainer)
    trained = json.loads(base.to_str())["model"]

    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for token in sorted(trained["vocab"], key=trained["vocab"].__getitem__):
        if token not in vocab:
            vocab[token] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def save_tokenizer(
    tokenizer: Tokenizer,
    out_dir: Path,
    *,
    bos_token: str | None,
    eos_token: str | None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    chat_template_in_config: bool = True,
) -> None:
    """Save through ``PreTrainedTokenizerFast`` so the files are exactly what transformers writes."""
    from transformers import PreTrainedTokenizerFast

    kwargs: dict[str, Any] = {}
    for key, value in (
        ("bos_token", bos_token),
        ("eos_token", eos_token),
        ("pad_token", pad_token),
        ("unk_token", unk_token),
    ):
        if value is not None:
            kwargs[key] = value
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_dir))
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    jinja_path = out_dir / "chat_template.jinja"
    if jinja_path.exists():
        jinja_path.unlink()
    config.pop("chat_template", None)
    if chat_template is not None:
        if chat_template_in_config:
            config["chat_template"] = chat_template
        else:
            jinja_path.write_text(chat_template, encoding="utf-8")
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _model_config(arch: Arch, vocab_size: int, bos_id: int, eos_id: int, tie: bool, **overrides: Any) -> Any:
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": tie,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    common.update(overrides)
    if arch == "llama":
        from transformers import LlamaConfig

        common.setdefault("rope_theta", 10000.0)
        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        common.setdefault("rope_theta", 1000000.0)
        return Qwen2Config(**common)
    if arch == "qwen3":
        from transformers import Qwen3Config

        common.setdefault("rope_theta", 1000000.0)
        common.setdefault("head_dim", 16)
        return Qwen3Config(**common)
    raise ValueError(f"unknown architecture {arch!r}")


def build_tiny_checkpoint(
    tmp_dir: Path,
    arch: Arch = "llama",
    *,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int | None = None,
    chat_template_in_config: bool = True,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a tiny random ``arch`` checkpoint into ``tmp_dir`` (created if needed) and return it.

    ``max_shard_size`` (e.g. ``"20KB"``) splits the weights over several safetensors files with a
    ``model.safetensors.index.json``. ``config_overrides`` go into the transformers config (e.g.
    ``{"rope_scaling": {...}}``).
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_bytelevel_tokenizer()
    save_tokenizer(
        tokenizer,
        tmp_dir,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=BOS_TOKEN,
        chat_template_in_config=chat_template_in_config,
    )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config = _model_config(arch, vocab_size, bos_id, eos_id, tie_word_embeddings, **(config_overrides or {}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init with a larger scale than the default so logits differ clearly between tokens.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    model = model.to(dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, bos_id], pad_token_id=bos_id
    )
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(tmp_dir), **save_kwargs)
    return tmp_dir


def build_sharded_checkpoint(tmp_dir: Path, arch: Arch = "llama", **kwargs: Any) -> Path:
    """Like ``build_tiny_checkpoint`` but split into several safetensors shards plus an index."""
    return build_tiny_checkpoint(tmp_dir, arch, max_shard_size="40KB", **kwargs)


def build_sentencepiece_tokenizer_dir(tmp_dir: Path) -> Path:
    """A tokenizer-only directory with a Llama-2-style (``▁``, byte fallback) tokenizer."""
    tmp_dir = Path(tmp_dir)
    save_tokenizer(
        train_sentencepiece_style_tokenizer(),
        tmp_dir,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=None,
    )
    return tmp_dir


# Strings tokenizer/detokenizer tests run over: ASCII, whitespace runs, accents, CJK, emoji (incl.
# ZWJ sequences and flags, which span many tokens), special-token text, and characters unseen in
# training.
SAMPLE_TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "The quick brown fox jumps over the lazy dog.",
    "Café naïve façade résumé jalapeño Straße",
    "こんにちは世界。今日はいい天気ですね。",
    "你好，世界！我们正在测试分词器。",
    "안녕하세요, 세계!",
    "Привет, как дела?",
    "Emoji 😀😃🚀🔥 ✨ 👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 rainbow 🏳️‍🌈",
    "math ∑ ∫ √ π ≈ ≠ ≤ ≥ → ∞ ± × ÷ and unseen ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜",
    "numbers 0 12 345 6789 3.14159 -42 1e-5",
    "code: def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
]


def reference_tokenizer(directory: Path) -> Any:
    """transformers' fast tokenizer for ``directory``, read faithfully from its tokenizer.json.

    (``AutoTokenizer`` in transformers 5 swaps in a model-type-specific pre-tokenizer, e.g. Qwen2's
    regex, ignoring the one our locally trained tokenizer.json declares.)
    """
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))


# Llama-shaped sizes in transformers' common naming, for the tiny checkpoints of most families.
LLAMA_LIKE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def build_family_checkpoint(tmp_dir: Path, model_type: str, config: dict[str, Any], *, seed: int = 0) -> Path:
    """A tiny random checkpoint of any ``transformers`` family (``config``: its config kwargs, in
    that family's naming), with the byte-level tokenizer; 1-D weights (norms) are drawn around 1."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tmp_dir = Path(tmp_dir)
    tokenizer = train_bytelevel_tokenizer()
    save_tokenizer(tokenizer, tmp_dir, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=BOS_TOKEN)
    bos_id, eos_id = tokenizer.token_to_id(BOS_TOKEN), tokenizer.token_to_id(EOS_TOKEN)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    hf_config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=bos_id,
        **config,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=generator))
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, bos_id], pad_token_id=bos_id
    )
    model.save_pretrained(str(tmp_dir))
    return tmp_dir


def add_gguf_tokenizer(writer: Any, directory: Path) -> None:
    """The checkpoint's byte-level BPE as llama.cpp writes a "gpt2" tokenizer into a GGUF file."""
    tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(tokenizer_json["model"]["vocab"])
    for added in tokenizer_json["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = {a["content"] for a in tokenizer_json["added_tokens"] if a["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    )
    writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_add_bos_token(False)


def assert_prefill_matches_transformers(runner: Any, reference_dir: Path, prompt: list[int]) -> None:
    """The runner's logits at every prompt position (one prefill, 4-token KV blocks) are those of
    ``transformers`` on the checkpoint at ``reference_dir``, within 1e-4 in float32."""
    import transformers

    from servekit.llm.model_runner import ForwardBatch

    reference = transformers.AutoModelForCausalLM.from_pretrained(str(reference_dir)).eval()
    out = runner.execute(ForwardBatch([prompt], [0], [list(range(len(prompt) // 4 + 1))], all_logits=[True]))
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    assert out.all_logits[0] is not None
    torch.testing.assert_close(out.all_logits[0], expected, atol=1e-4, rtol=0)
