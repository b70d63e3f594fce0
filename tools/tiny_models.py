"""Tiny random-initialised test models, built offline: one helper for the tests and the benchmarks.

:func:`make_model_dir` saves a tiny Llama causal LM with a byte-level BPE tokenizer trained on a
few sentences (the tests' ``tiny_model_dir``); :func:`make_vlm_dir` a tiny Qwen2-VL with its
processor parts (tests/test_vlm.py and ``python -m tools.bench vlm``). Nothing is downloaded, and
torch / transformers are imported only when a model is built.

The Qwen2-VL folder holds what a real Qwen2-VL folder holds (config with ``vision_config``,
safetensors, tokenizer with ``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``,
a Qwen-style chat template, ``preprocessor_config.json``) except ``processor_config.json``
and a video processor: in transformers 5 the Qwen2-VL processor needs torchvision for its
video half, which the CPU test environment does not have. :func:`qwen2vl_processor`
builds the real ``Qwen2VLProcessor`` around the parts anyway (video half left out) so
the tests can compare the runner's fallback with it.
"""

from __future__ import annotations

from pathlib import Path

LM_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "reverse the words of this sentence please",
    "solve the following math problem answer 42",
    "a chatbot that performs a specific transformation on sentences",
    "cats and dogs are friends in the garden",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols -> * .",
]


def make_lm_tokenizer():
    """A byte-level BPE tokenizer (vocabulary 320, ``<pad>``, ``<s>``, ``</s>``) trained on :data:`LM_CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(LM_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model_dir(path: Path, tied: bool = False, seed: int = 0) -> Path:
    """Save a tiny Llama (hidden 32, 2 layers; untied LM head by default) + tokenizer into ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_lm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger output weights: peaked softmax, like a trained model
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SPECIALS = [
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VLM_CORPUS = [
    "user assistant what is shown in the picture? answer with the colour and the shape.",
    "a red circle",
    "a blue square",
    "a green triangle",
    "yellow horizontal stripes",
    "a purple checkerboard",
    "an orange cross",
    "a cyan ring",
    "a pink diamond",
    "describe the image please",
    "the quick brown fox jumps over the lazy dog",
    "cats and dogs are friends in the garden",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_vlm_tokenizer():
    """A byte-level BPE tokenizer with the Qwen vision tokens and a Qwen-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(VLM_CORPUS * 20, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    out.chat_template = CHAT_TEMPLATE
    return out


def make_image_processor(max_pixels: int = 112 * 112):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )


def make_vlm_dir(path: Path, seed: int = 0, hidden: int = 48) -> Path:
    """Save a tiny Qwen2-VL (2 text layers, 1 vision block, untied LM head) with tokenizer and image processor."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = make_vlm_tokenizer()
    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
        ),
        vision_config=dict(
            depth=1,
            embed_dim=32,
            hidden_size=hidden,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            mlp_ratio=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    with torch.no_grad():  # larger output weights: a peaked softmax, like a trained model
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    make_image_processor().save_pretrained(path)
    (Path(path) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return Path(path)


def qwen2vl_processor(folder: Path):
    """The real ``Qwen2VLProcessor`` over the folder's tokenizer and image processor, without its video half."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None  # the video half needs torchvision
    try:
        return Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=CHAT_TEMPLATE
        )
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
