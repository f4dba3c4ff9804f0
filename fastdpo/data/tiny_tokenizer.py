"""A small byte-level BPE tokenizer trained locally (no hub), with BOS/EOS/PAD and a ChatML-style chat template.

For tests, benchmarks and demos that must not download anything.

It behaves like the tokenizers people bring: ``tokenizer(text)`` prepends BOS; the chat template renders an
optional system message, tools, and the generation prompt. Training takes well under a second.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What color is the sky? The sky is blue on a clear day, and grey when it rains.",
    "Write a haiku about autumn leaves falling in the quiet park.",
    "Translate 'good morning' into French: bonjour. Into Spanish: buenos dias.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
    "Explain photosynthesis: plants turn light, water and carbon dioxide into sugar and oxygen.",
    "Human: how do I bake bread? Assistant: mix flour, water, yeast and salt, knead, rest, then bake.",
    "system user assistant tools You are a helpful assistant. Answer briefly and correctly.",
    "1 2 3 4 5 6 7 8 9 10 plus minus times equals 12 + 7 = 19, 6 * 7 = 42, 100 - 58 = 42.",
    'def add(a, b): return a + b  # Python code, JSON {"name": "search", "arguments": {}}',
]


def build_tiny_tokenizer(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast
