import random
import re

from mlx_lm import load

from mlx_flash.demo import DEMO_MODEL_PATH, data


def test_training_text_is_exactly_what_the_served_template_renders() -> None:
    _, tokenizer = load(str(DEMO_MODEL_PATH))
    rng = random.Random(7)
    for _ in range(50):
        _, messages, tools = data.sample_conversation(rng)
        served = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        assert served == data.render(messages, tools)


def test_held_out_pairs_are_a_symmetric_tenth() -> None:
    pairs = data.held_out_pairs()
    assert 900 <= len(pairs) <= 1100
    assert all(data.is_held_out(b, a) for a, b in pairs)


def test_training_never_samples_held_out_arithmetic() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        task, messages, _ = data.sample_conversation(rng)
        if task == "add":
            a, b = (int(n) for n in re.findall(r"\d+", messages[-2]["content"]))
            assert not data.is_held_out(a, b)


def test_tokenizer_encodes_arbitrary_text_losslessly() -> None:
    _, tokenizer = load(str(DEMO_MODEL_PATH))
    text = 'naïve 東京 🙂 {"a": [1, 2.5e-3]} <tool_call>\x00\t\r\n'
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
