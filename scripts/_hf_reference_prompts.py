"""The prompts of the Hugging Face reference fixtures (`make_hf_reference.py`); the tests read
them back from the fixtures, never from here."""

from __future__ import annotations

from dataclasses import dataclass

CHAT_USER_MESSAGE = "Write a short poem about the ocean."


# Gemma's GGUF carries no chat template; this is the Gemma 3 turn format, written by hand. BOS is
# not part of the text: ordinary tokenization adds it.
GEMMA3_CHAT_TEXT = f"<start_of_turn>user\n{CHAT_USER_MESSAGE}<end_of_turn>\n<start_of_turn>model\n"


CODE_PROMPT = '''def weighted_percentile(values: list[float], weights: list[float], q: float):
    """Return the q-th weighted percentile of ``values``.

    Args:
        values: The sample values; they need not be sorted.
        weights: Non-negative weights, one per value.
        q: The percentile to compute, between 0 and 100 inclusive.
    """
    pairs = sorted(zip(values, weights))
    total = sum(w for _, w in pairs)
    target = q / 100.0 * total
    running = 0.0
    for value, weight in pairs:
        running += weight
        if running >= target:
'''


MANY_PAGES_PROMPT = (
    "For most of the nineteenth century, the lighthouse keeper was one of the loneliest figures "
    "in public service. A typical station stood on a bare rock or at the end of a long spit of "
    "sand, and the keeper, often with a wife and one or two assistants, was expected to keep the "
    "lamp burning from sunset to sunrise without a single interruption. The work itself was "
    "repetitive rather than difficult. Every evening the wicks had to be trimmed, the brass "
    "polished, and the great lens wiped clean of soot and salt; every few hours during the night "
    "someone climbed the tower to wind the clockwork that turned the light. Logbooks from the "
    "period record the weather, the passing ships, and the quantity of oil burned, usually in a "
    "careful hand and with very little comment. Illness was a constant worry, since the nearest "
    "doctor might be a day's sail away, and more than one keeper set a broken bone by following "
    "the diagrams in a medical almanac. Not everyone found the life unbearable, however. Several "
    "keepers kept detailed notes on migrating birds, and their observations, collected decades "
    "later by naturalists, turned out to be among the most reliable records of their kind. When "
    "electric lamps and automatic timers finally replaced the old oil burners, most stations "
    "were closed within a few years, and the keepers moved to towns where, according to one of "
    "them, the hardest thing to get used to was the silence of a night without the sea. "
    "Historians who study these records today are struck less by the hardship than by the "
    "routine, because the routine was what kept the light burning and the ships off the rocks, "
    "and because it reveals how ordinary people organised their days when nobody was watching "
    "them. In one well-known case, a keeper on a remote northern island continued to fill in his "
    "logbook every night for eleven years, even though the inspector who was supposed to read it "
    "visited only twice, and on both occasions he praised the neatness of the entries before he "
    "had"
)


LONG_PROMPT = (
    "The Clockmaker of Varrow\n\n"
    "1. The shop on Lantern Street\n\n"
    "In the town of Varrow, where the river bends twice before it reaches the sea, there was a "
    "narrow shop squeezed between a bakery and a bookbinder. Its window was crowded with "
    "clocks of every size. The owner, Ilse Marwen, had inherited the business from her "
    "grandfather, together with a ledger of customers who had not paid their bills since "
    "before she was born.\n\n"
    "2. The broken tower clock\n\n"
    "One wet morning in October, the mayor's secretary came in without knocking. The great "
    "clock on the town hall had stopped at seventeen minutes past four, he said, and the mayor "
    "wanted it running before the harvest fair, which was nine days away. Three engineers from "
    "the capital had already looked at it and found nothing wrong: every wheel turned freely, "
    "yet the pendulum always slowed and stopped within a minute.\n\n"
    "3. Climbing the tower\n\n"
    "That afternoon she climbed the hundred and twelve steps of the tower with a bag of tools "
    "on her shoulder. She cleaned the escapement, checked the teeth of every wheel with a "
    "magnifying glass, and measured the length of the pendulum rod twice. Everything was "
    "exactly as the engineers had reported. Then she noticed something they had missed: a "
    "faint scratch on the floor, curving in an arc beneath the pendulum, as though the bob had "
    "been brushing against a stone that was no longer there.\n\n"
    "4. The apprentice's story\n\n"
    "In the evening she visited Tomas Brell, who had been the tower's keeper for forty years "
    "before his knees gave out. When she described the scratch, the old man laughed so hard "
    "that he had to sit down. Long ago, he explained, the floor of the clock room had sagged "
    "after a winter flood, and the pendulum had started to touch it. Rather than rebuild the "
    "floor, the town council had paid a mason to shave a groove into the stone. Last spring, "
    "however, the council had finally replaced the old floor with new oak boards, level and "
    "handsome, and no one had thought to ask why the groove had been there in the first place.\n\n"
    "5. A question of millimetres\n\n"
    "The next day Ilse returned with a spirit level, a plumb line, and a notebook. She "
    "discovered that the tower itself had been leaning, very slowly, for more than a century. "
    "The lean was far too small to see from the square, only a few millimetres for every metre "
    "of height, but it was enough to tilt the whole frame of the clock. On the old sagging "
    "floor the pendulum had hung clear; on the new level floor it dragged against the boards "
    "at the bottom of every swing, losing a little energy each time until it stopped. The "
    "engineers had checked the clock but never the building around it.\n\n"
    "6. The repair\n\n"
    "Moving the tower was impossible, and cutting a new groove into fresh oak seemed to her "
    "like an insult to the carpenter. Instead, Ilse spent three nights adjusting the frame. "
    "She loosened the heavy bolts that held it to the wall, slid thin brass shims beneath the "
    "brackets on the lower side, and tightened everything again, checking the plumb line after "
    "each turn of the spanner. On the third night, a little after midnight, she set the "
    "pendulum swinging and sat down on a crate to watch. At dawn the clock struck six for the "
    "first time since the spring, and she heard, faintly, a cheer from the bakers who were "
    "already at work below.\n\n"
    "7. The harvest fair\n\n"
    "On the day of the fair the mayor made a long speech about the spirit of the town, the "
    "wisdom of its council, and the excellence of its engineers. He did not mention Ilse at "
    "all. She was standing at the back of the crowd with Tomas Brell, and when the great clock "
    "struck noon the old man took off his hat and held it over his heart. Later that week an "
    "envelope arrived at the shop on Lantern Street. Inside was a note from the council, "
    "thanking her for her services, and a payment that covered exactly half of her bill. Ilse "
    "read it twice, smiled, and wrote the remaining amount in her grandfather's ledger, on a "
    "fresh page, just below the names of the customers who had"
)


@dataclass(frozen=True)
class Prompt:
    """One reference prompt: ``kind`` is ``"text"`` (used verbatim) or ``"chat"`` (templated)."""

    id: str
    kind: str
    text: str
    description: str


PROMPTS: tuple[Prompt, ...] = (
    Prompt("short", "text", "The capital of France is", "one short factual sentence"),
    Prompt(
        "chat",
        "chat",
        CHAT_USER_MESSAGE,
        "one user turn in the model's chat format, ending at the model's turn",
    ),
    Prompt("code", "text", CODE_PROMPT, "~150-token Python function, ending mid-function"),
    Prompt("many_pages", "text", MANY_PAGES_PROMPT, "~400-token passage, ending mid-sentence"),
    Prompt(
        "long",
        "text",
        LONG_PROMPT,
        "~700-900-token story, longer than Gemma 3's 512-token sliding window",
    ),
)
