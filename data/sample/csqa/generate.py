"""Writes the CommonsenseQA sample (train_rand_split.jsonl, dev_rand_split.jsonl,
test_rand_split_no_answers.jsonl) in CommonsenseQA's format.

    .venv/bin/python data/sample/csqa/generate.py

Our own questions. Each *frame* below is five choices and five questions (with their
question concepts), question k answered by choice k; a frame yields five examples with
the same five choices. So every choice text is right exactly once and wrong four times,
and knowing which answers were right in training says nothing about a new question.
Frames never cross splits (no question or choice set is shared between train, dev and
test); the right answer's label is balanced over A-E and otherwise seeded-random; the
test file has no answerKey, like the real one.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SEED = 11
LABELS = "ABCDE"

# ([choice 0..4], [(concept, question answered by choice 0), ... choice 4])
FRAMES = [
    (["campground", "bank", "garage", "hospital", "bakery"],
     [("tent", "Where would you most likely find a tent?"),
      ("cash", "Where is a lot of cash kept behind thick doors?"),
      ("car", "Where do people usually leave their car at night?"),
      ("nurse", "Where would a nurse spend a night shift?"),
      ("loaf", "Where would you buy a warm loaf early in the morning?")]),
    (["refrigerator", "closet", "bookshelf", "garden", "bathtub"],
     [("milk", "Where do you keep milk so that it stays fresh?"),
      ("coat", "Where would you hang a winter coat in summer?"),
      ("novel", "Where would you put a novel after reading it?"),
      ("tulip", "Where would you plant tulip bulbs?"),
      ("bubbles", "Where does a child usually play with bubbles and rubber ducks?")]),
    (["opening a lock", "digging a hole", "boiling water", "driving nails", "cutting paper"],
     [("key", "What task is a key good for?"),
      ("shovel", "What is a shovel mostly used for?"),
      ("kettle", "What do people use a kettle for?"),
      ("hammer", "What job is a hammer made for?"),
      ("scissors", "What are scissors used for in an office?")]),
    (["library", "stadium", "airport", "museum", "church"],
     [("borrow", "Where can you borrow books for free?"),
      ("match", "Where would thousands of fans watch a football match?"),
      ("flight", "Where do you go to catch a flight?"),
      ("painting", "Where would you see old paintings and statues?"),
      ("wedding", "Where might a couple get married with a choir singing?")]),
    (["sleep", "eat", "laugh", "shiver", "sweat"],
     [("tired", "What does a person do when they are very tired?"),
      ("hungry", "What does someone do when they are hungry?"),
      ("joke", "What do people do when they hear a good joke?"),
      ("cold", "What does your body do when you are cold?"),
      ("exercise", "What does your skin do during hard exercise on a hot day?")]),
    (["ocean", "desert", "forest", "mountain", "river"],
     [("whale", "Where does a whale live?"),
      ("camel", "Where is a camel well suited to live?"),
      ("owl", "Where would an owl sleep among the trees?"),
      ("snow", "Where would you find snow even in summer?"),
      ("bridge", "What does a bridge often cross?")]),
    (["hospital", "classroom", "kitchen", "courtroom", "farm"],
     [("surgeon", "Where does a surgeon work?"),
      ("student", "Where do students listen to a teacher?"),
      ("chef", "Where does a chef prepare meals?"),
      ("judge", "Where does a judge hear a case?"),
      ("tractor", "Where would you expect to see a tractor and cows?")]),
    (["umbrella", "sunglasses", "scarf", "boots", "gloves"],
     [("rain", "What would you carry to stay dry in the rain?"),
      ("glare", "What do you wear to protect your eyes from bright sun?"),
      ("neck", "What would you wrap around your neck on a cold day?"),
      ("mud", "What do you wear on your feet to walk through deep mud?"),
      ("hands", "What keeps your hands warm in winter?")]),
    (["happy", "sad", "angry", "scared", "surprised"],
     [("gift", "How does someone usually feel when they get a gift they wanted?"),
      ("funeral", "How do people usually feel at a funeral?"),
      ("cheat", "How would you feel if someone cheated you?"),
      ("noise", "How might a child feel hearing a strange noise in the dark?"),
      ("party", "How does someone feel when friends jump out at an unexpected party?")]),
    (["pharmacy", "post office", "petrol station", "hairdresser", "bakery"],
     [("medicine", "Where do you pick up medicine a doctor ordered?"),
      ("stamp", "Where would you send a parcel and buy stamps?"),
      ("fuel", "Where do you fill up the tank of a car?"),
      ("haircut", "Where would you go to get a haircut?"),
      ("bread", "Where are rolls and bread made each morning?")]),
    (["read", "swim", "cook", "paint", "sing"],
     [("book", "What do you do with a book?"),
      ("pool", "What do people do in a pool?"),
      ("stove", "What do you do at a stove?"),
      ("brush", "What might an artist do with a brush and canvas?"),
      ("choir", "What do members of a choir do?")]),
    (["knife", "spoon", "plate", "cup", "pan"],
     [("slice", "What do you use to slice bread?"),
      ("soup", "What do you eat soup with?"),
      ("dinner", "What do you serve dinner on?"),
      ("tea", "What do you drink tea from?"),
      ("fry", "What do you fry eggs in?")]),
    (["winter", "spring", "summer", "autumn", "night"],
     [("snowman", "When do children build a snowman?"),
      ("blossom", "When do fruit trees blossom?"),
      ("beach", "When do most families go to the beach?"),
      ("leaves", "When do the leaves turn brown and fall?"),
      ("stars", "When can you see the stars?")]),
    (["doctor", "pilot", "baker", "teacher", "plumber"],
     [("illness", "Who would you visit when you are ill?"),
      ("plane", "Who flies a plane?"),
      ("cake", "Who makes cakes for a living?"),
      ("lesson", "Who gives lessons to children?"),
      ("pipe", "Who would you call for a leaking pipe?")]),
    (["bed", "desk", "sofa", "table", "shelf"],
     [("night", "Where do you sleep at night?"),
      ("homework", "Where does a student do homework?"),
      ("television", "Where do people sit to watch television?"),
      ("meal", "Where do families eat a meal together?"),
      ("vase", "Where might you put a vase to show it off?")]),
    (["zoo", "aquarium", "stable", "kennel", "aviary"],
     [("lion", "Where could a city child see a lion?"),
      ("shark", "Where would you see sharks behind glass?"),
      ("horse", "Where does a horse sleep?"),
      ("dog", "Where might a dog stay while its owners are away?"),
      ("parrot", "Where are many birds kept in a large cage?")]),
    (["wallet", "suitcase", "backpack", "envelope", "basket"],
     [("coins", "Where do people carry coins and cards?"),
      ("trip", "What do you pack clothes in for a long trip?"),
      ("school", "What do pupils carry their books in?"),
      ("letter", "What do you put a letter in before posting it?"),
      ("picnic", "What would you carry apples in on a picnic?")]),
    (["thirsty", "sleepy", "lonely", "bored", "nervous"],
     [("water", "How does someone feel when they need water?"),
      ("yawn", "How does a person who keeps yawning feel?"),
      ("alone", "How might someone feel after a year living alone far from friends?"),
      ("nothing", "How does a child feel with nothing to do on a rainy day?"),
      ("exam", "How do many people feel before a big exam?")]),
    (["hammer", "saw", "ladder", "rope", "bucket"],
     [("nail", "What tool pushes a nail into wood?"),
      ("plank", "What do you cut a plank with?"),
      ("roof", "What do you climb to reach a roof?"),
      ("tie", "What would you use to tie a boat to a post?"),
      ("well", "What would you carry water from a well in?")]),
    (["island", "valley", "cave", "volcano", "waterfall"],
     [("surrounded", "What is land surrounded by water called?"),
      ("between", "What lies low between two hills?"),
      ("bats", "Where do bats hang in the dark?"),
      ("lava", "What can pour out lava?"),
      ("falling", "What do you call water falling over a cliff?")]),
    (["breakfast", "lunch", "dinner", "dessert", "snack"],
     [("morning", "Which meal do people eat in the morning?"),
      ("noon", "Which meal is eaten around noon?"),
      ("evening", "Which meal is eaten in the evening?"),
      ("sweet", "What sweet course comes after the main meal?"),
      ("between", "What small bite do you have between meals?")]),
    (["train", "bicycle", "ship", "helicopter", "bus"],
     [("rails", "What runs on rails?"),
      ("pedal", "What do you pedal to move?"),
      ("sea", "What carries goods across the sea?"),
      ("rooftop", "What can land on the roof of a hospital?"),
      ("stop", "What do people wait for at a stop in town?")]),
    (["clock", "mirror", "lamp", "map", "calendar"],
     [("time", "What do you look at to know the time?"),
      ("face", "What do you look in to check your face?"),
      ("dark", "What do you turn on when a room is dark?"),
      ("way", "What helps you find the way in a new city?"),
      ("date", "What do you check to find the date of a meeting?")]),
    (["teeth", "hair", "hands", "ears", "eyes"],
     [("toothbrush", "What do you clean with a toothbrush?"),
      ("comb", "What do you brush with a comb?"),
      ("soap", "What should you wash with soap before eating?"),
      ("music", "What do you use to hear music?"),
      ("glasses", "What do glasses help?")]),
    (["fire station", "police station", "school", "factory", "prison"],
     [("fire engine", "Where is a fire engine kept?"),
      ("thief", "Where is a thief first taken after arrest?"),
      ("pupil", "Where do pupils go on weekdays?"),
      ("machine", "Where are goods made by machines?"),
      ("sentence", "Where does someone serve a long sentence?")]),
    (["winning", "losing", "waiting", "learning", "moving"],
     [("trophy", "What does a team that lifts a trophy do?"),
      ("defeat", "What is it called when a team is beaten?"),
      ("queue", "What are people in a queue doing?"),
      ("lessons", "What is a student taking lessons doing?"),
      ("boxes", "What is a family packing everything into boxes probably doing?")]),
]
SPLITS = {"train_rand_split.jsonl": 16, "dev_rand_split.jsonl": 5,
          "test_rand_split_no_answers.jsonl": 5}  # frames per split


def main() -> None:
    assert len(FRAMES) == sum(SPLITS.values()) and all(
        len(choices) == len(questions) == 5 for choices, questions in FRAMES)
    rng = random.Random(SEED)
    frames = list(FRAMES)
    rng.shuffle(frames)
    out = Path(__file__).parent
    start = 0
    for file_name, count in SPLITS.items():
        lines = []
        for number, (choices, questions) in enumerate(frames[start:start + count]):
            for k, (concept, stem) in enumerate(questions):
                position = (number + k) % 5  # the right choice's label: balanced over A-E
                others = [i for i in range(5) if i != k]
                rng.shuffle(others)
                order = others[:position] + [k] + others[position:]
                record = {"answerKey": LABELS[position],
                          "id": hashlib.md5(stem.encode()).hexdigest(),
                          "question": {"question_concept": concept,
                                       "choices": [{"label": LABELS[slot], "text": choices[i]}
                                                   for slot, i in enumerate(order)],
                                       "stem": stem}}
                if file_name.endswith("no_answers.jsonl"):
                    del record["answerKey"]
                lines.append(json.dumps(record))
        start += count
        (out / file_name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
