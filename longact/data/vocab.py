"""Word lists shared by the synthetic long-context tasks and the tiny tokenizer.

Every word a task generator can emit comes from these lists (plus digits and the
punctuation in ``SYMBOLS``), and the tiny tokenizer is trained on text built from them,
so on the CPU default each word is one or two tokens. A real tokenizer (Qwen3's)
covers them anyway.
"""

from __future__ import annotations

# Haystack filler: common English words, enough variety for natural-looking noise.
FILLER = """
the a an of to in and or but for with on at by from as is was are were be been has
have had do does did not no yes this that these those it its they them their there
here then than so very more most less some any many much few all each every other
another same such only just also even still yet again once never always often
sometimes day night morning evening week month year time hour minute season spring
summer autumn winter weather rain snow wind sun moon star sky cloud river lake sea
ocean mountain hill valley forest tree leaf flower grass stone sand road street path
bridge house home room door window wall roof garden field farm city town village
market school library museum station harbor castle tower church shop office table
chair book letter paper story song music picture color light dark warm cold old new
young small large long short high low fast slow quiet loud soft hard early late good
bad happy sad bright clear calm busy simple quick strong gentle walk walked run ran
read wrote write see saw look looked find found keep kept make made take took give
gave go went come came know knew think thought say said tell told carry carried open
opened close closed build built grow grew travel traveled visit visited remember
remembered watch watched wait waited people person man woman child children friend
family teacher student farmer traveler king queen captain doctor writer painter
neighbor stranger water bread fruit apple tea coffee milk food dinner lunch breakfast
way part place thing world life work word number question answer reason idea plan
""".split()

# Keys for needles and facts: nouns that are easy to tell apart.
KEYS = """
amber anchor apricot arrow aster badger bamboo banner beacon birch bison blossom
bramble breeze bronze cactus canyon cedar cherry cobalt comet copper coral cosmos
crane crystal cypress daisy delta dolphin dragon eagle ember falcon fern fig
flint fox galaxy garnet ginger glacier granite harbor hazel heron horizon iris ivory
jade jaguar jasmine juniper kestrel koala lagoon lantern lemon lilac lotus lynx
magnet maple marble meadow meteor mint nebula nectar nova oak olive onyx orchid otter
panda pebble pepper phoenix pine plum prism quartz raven reef ripple robin ruby saffron
sage sapphire sequoia silver sparrow spruce summit swan thistle thunder tiger topaz
tulip tundra velvet violet walnut willow wolf zephyr
""".split()

# Values that are words (multi-value needles, QA answers).
VALUES = """
red orange yellow green blue purple pink brown black white gray gold north south east
west up down left right first second third last alpha beta gamma omega circle square
triangle diamond heart spade club crown sword shield ring bell drum flute harp piano
violin guitar
""".split()

# Variable names for variable tracking (upper case, one token each in the tiny tokenizer).
VARIABLES = """
AXQ BRT CDM DLP EKN FZW GHS HJV IQB JWC KLR LMX MNT NPD OQZ PRS QVK RXL SMY TJB UQW
VDF WKP XHN YRC ZGT
""".split()

# Words of the answer formats and instructions.
FORMAT_WORDS = """
The What Which Who Where When How Answer Question Document Context Options Choice
Read Find Remember Memorize Output List Give Return Note Only special magic
number numbers value values key keys secret code variable variables assigned equal
equals VAR word words common frequent most appear appears appearing times correct
answer is are following below above text passage document documents options choice
A B C D Yes No none hidden inside mentioned named called title about fact facts
according based only format end
""".split()

SYMBOLS = list(".,:;?!()[]{}'\"-=+*/_#%<>|")
DIGITS = list("0123456789")


def all_words() -> list[str]:
    """Every word the tasks use, deduplicated, in a fixed order."""
    seen: dict[str, None] = {}
    for w in FILLER + KEYS + VALUES + VARIABLES + FORMAT_WORDS:
        seen.setdefault(w, None)
    return list(seen)
