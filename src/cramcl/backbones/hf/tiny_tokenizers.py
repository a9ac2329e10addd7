"""Tokenizers of the tiny models (:mod:`cramcl.backbones.hf.tiny_models`): a byte-level BPE trained in
milliseconds on a small corpus (so any text round-trips) with each architecture's special tokens, its end-of-turn
tokens and its chat template, written in the architecture's own prompt format.

    build_tokenizer("gemma3")   # also: llava, qwen2_vl, qwen2_5_vl, idefics3, internvl, llava_onevision
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [  # tokenizer training text; byte-level BPE round-trips any other text too
    "USER: ASSISTANT: User: Assistant: user assistant system",
    "What shape is in the image? circle square triangle star",
    "What colour is the shape? red green blue yellow black white",
    "How many dots are there? one two three four five 1 2 3 4 5",
    "Is there a circle in the image? yes no. Answer with one word.",
    "Read the text in the image. Describe the image in a sentence.",
]

# Chat templates, one per architecture's prompt format (content: a list of {"type": "image"|"text"} parts).
_PARTS = ("{% for c in m['content'] %}{% if c['type'] == 'image' %}IMG{% endif %}{% endfor %}"
          "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}")
_CHATML_QWEN_VL = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                   + _PARTS.replace("IMG", "<|vision_start|><|image_pad|><|vision_end|>")
                   + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEMPLATES = {
    # LLaVA-1.5: "USER: <image>\n{question} ASSISTANT: {answer}</s>"
    "llava": ("{% for m in messages %}{% if m['role'] == 'user' %}USER: " + _PARTS.replace("IMG", "<image>\n")
              + " {% else %}ASSISTANT: " + _PARTS.replace("IMG", "") + "</s>{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}ASSISTANT:{% endif %}"),
    # Qwen2-VL: ChatML with <|vision_start|><|image_pad|><|vision_end|>
    "qwen2_vl": _CHATML_QWEN_VL,
    # Qwen2.5-VL: the same, with the default system turn its template writes when none is given
    "qwen2_5_vl": ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
                   "<|im_end|>\n{% endif %}" + _CHATML_QWEN_VL),
    # Idefics3 / SmolVLM: "<|begin_of_text|>User:<image>{question}<end_of_utterance>\nAssistant: {answer}..."
    "idefics3": ("<|begin_of_text|>{% for m in messages %}{% if m['role'] == 'user' %}User:"
                 + _PARTS.replace("IMG", "<image>") + "{% else %}Assistant: " + _PARTS.replace("IMG", "")
                 + "{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"),
    # InternVL (HF-native): ChatML with <IMG_CONTEXT> expanded by the processor to <img>...</img>
    "internvl": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n" + _PARTS.replace("IMG", "<IMG_CONTEXT>\n")
                 + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    # LLaVA-OneVision (llava-hf): the checkpoints' template as published. A turn opens with "role " (a space)
    # while the generation prompt opens with "assistant\n", so a full conversation does not extend the prompt
    "llava_onevision": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
        "{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
        "{% endfor %}{% else %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
        "{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    # Gemma 3: the checkpoints' template (image and text parts): it writes the bos itself, the assistant's
    # role is "model", a turn ends with <end_of_turn> (a stop token besides <eos>)
    "gemma3": (
        "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
        "{%- set loop_messages = messages -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
        "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
        "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
        "{%- for item in message['content'] -%}"
        "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
        "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
        "{%- endfor -%}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"),
}


@dataclass(frozen=True)
class Specials:
    tokens: list[str]  # special tokens, in vocabulary order
    eos: str
    pad: str
    bos: str | None = None
    extra: dict = field(default_factory=dict)  # named tokens the processor reads (image_token, boi_token, ...)
    stops: tuple[str, ...] = ()  # further end-of-turn tokens of the generation config
    add_bos: bool = False  # the tokenizer prepends the bos itself (as Gemma's does)


_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
         "<|video_pad|>"]
SPECIALS = {
    "llava": Specials(["<pad>", "<s>", "</s>", "<image>"], "</s>", "<pad>", "<s>", {"image_token": "<image>"}),
    "qwen2_vl": Specials(_QWEN, "<|im_end|>", "<|endoftext|>",
                         extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    "qwen2_5_vl": Specials(_QWEN, "<|im_end|>", "<|endoftext|>", stops=("<|endoftext|>",),
                           extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
    "idefics3": Specials(["<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>",
                          "<image>", "<global-img>"], "<end_of_utterance>", "<|end_of_text|>", "<|begin_of_text|>"),
    "internvl": Specials(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                          "<video>"], "<|im_end|>", "<|endoftext|>",
                         extra={"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}),
    "llava_onevision": Specials(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], "<|im_end|>",
                                "<|endoftext|>", extra={"image_token": "<image>", "video_token": "<video>"}),
    "gemma3": Specials(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                        "<end_of_image>", "<image_soft_token>"], "<eos>", "<pad>", "<bos>",
                       {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                        "eoi_token": "<end_of_image>"}, stops=("<end_of_turn>",), add_bos=True),
}


def build_tokenizer(arch: str, corpus: list[str] = (), vocab_size: int = 384):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with the architecture's special tokens and chat template."""
    spec = SPECIALS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec.tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*_CORPUS, *corpus] * 4, trainer)
    kwargs = {"bos_token": spec.bos, "add_bos_token": spec.add_bos} if spec.bos else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec.eos, pad_token=spec.pad,
                                  extra_special_tokens=spec.extra or None, chat_template=TEMPLATES[arch], **kwargs)
    out.add_special_tokens({"additional_special_tokens": [s for s in spec.tokens
                                                          if s not in (spec.bos, spec.eos, spec.pad)]})
    return out


def generation_stop_ids(arch: str, tok) -> list[int]:
    """The generation config's ``eos_token_id``: the tokenizer's eos and the template's other end-of-turn tokens."""
    return [tok.eos_token_id, *tok.convert_tokens_to_ids(list(SPECIALS[arch].stops))]
