"""Writes the CosmosQA sample (train.jsonl, valid.jsonl, test.jsonl) in CosmosQA's format.

    .venv/bin/python data/sample/cosmosqa/generate.py

Our own text. Each *frame* below is one question with four answers and four short
contexts, context k making answer k the right one; a frame yields four examples that
share the question and the answer texts. So every answer text is right exactly once
and wrong three times, and its length or its words cannot tell which it is: only
reading the context can. Frames never cross splits (no context, question or answer is
shared between train, valid and test), the right answer's position is balanced over
0-3 and otherwise seeded-random, and test.jsonl is unlabelled like the real one.
A few frames end in CosmosQA's "None of the above choices ." for a context where no
other answer holds.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SEED = 13
NONE = "None of the above choices ."
NAMES = [("Farid", "m"), ("Gina", "f"), ("Tomas", "m"), ("Leila", "f"), ("Ben", "m"), ("Priya", "f"),
         ("Marco", "m"), ("Anna", "f"), ("Kofi", "m"), ("Carla", "f"), ("Jonas", "m"), ("Mei", "f"),
         ("Samuel", "m"), ("Ines", "f"), ("Dmitri", "m"), ("Rosa", "f")]
PRONOUNS = {"m": {"he": "he", "him": "him", "his": "his", "He": "He", "His": "His"},
            "f": {"he": "she", "him": "her", "his": "her", "He": "She", "His": "Her"}}

# (question, [answer 0..3], [context making answer 0 right, ... answer 3 right])
FRAMES = [
    ("Why was {name} late for work ?",
     ["{His} train never came .", "{He} slept through {his} alarm .",
      "{He} stopped to help a neighbour .", "A fallen tree closed the road ."],
     ["{name} stood on the platform for an hour while the board kept saying delayed , then walked into the office after ten .",
      "{name} had watched films until three in the morning , and the phone buzzed on the table for a long time before {he} opened {his} eyes .",
      "On the stairs {name} found the old woman from next door with heavy bags , and carried them up four floors for her .",
      "A storm in the night had brought down an old oak across the only street out of the village , and {name} had to wait in the car until the council cut it away ."]),
    ("What will {name} probably do next ?",
     ["Call a plumber .", "Buy a new umbrella .", "Go back to bed .", "Look for {his} lost cat ."],
     ["Water has been dripping from {name}'s kitchen ceiling since dawn , and the bucket under it is already half full .",
      "The wind turned {name}'s old one inside out on the bridge and snapped two of its ribs , and the rain has not stopped .",
      "{name} woke at four with a headache , checked the clock and saw that nothing was planned before noon .",
      "{name}'s back door was open all night , and this morning the bowl of food by the stove is still untouched ."]),
    ("How does {name} probably feel ?",
     ["Proud of {him}self .", "Worried about {his} brother .", "Bored and restless .", "Embarrassed ."],
     ["After months of practice , {name} finished the marathon in under four hours and the whole family was waiting at the line .",
      "The hospital called to say that {name}'s brother had been brought in after a crash , but gave no other news .",
      "It has rained for five days , the internet is down , and {name} has already read every book in the cottage twice .",
      "In front of the whole class , {name} tripped over a bag and spilled coffee over the teacher's notes ."]),
    ("What might have happened before this ?",
     ["{name} lost {his} keys .", "{name} won a prize .", "{name} had an argument with a friend .", NONE],
     ["{name} sat on the doorstep for an hour until the landlord came with a spare set .",
      "{name} walked home from the town hall holding a silver cup and a large cheque .",
      "{name} kept checking {his} phone , but the friend who usually writes every evening sent nothing , and {name} did not write either .",
      "{name} spent a quiet afternoon painting the garden fence green ."]),
    ("Why did {name} go to the market early ?",
     ["To get the freshest fish .", "To avoid the crowds .", "To sell {his} own vegetables .", "To meet an old friend there ."],
     ["{name} knows that the boats come in at dawn , and that by nine the best of the catch is gone .",
      "{name} hates pushing through people , and by ten the narrow lanes are packed shoulder to shoulder .",
      "{name}'s garden gave more tomatoes and beans than the family could eat , so {he} loaded the cart and rented a stall .",
      "A letter from Lisbon said that Pedro , whom {name} had not seen since school , would be at the coffee stand at seven ."]),
    ("What is probably true about {name} ?",
     ["{He} is a nurse .", "{He} is a teacher .", "{He} is a farmer .", "{He} is a pilot ."],
     ["{name} changed the dressing on the patient's leg , checked the drip and wrote the dose on the chart .",
      "{name} spent the evening marking thirty essays and planning tomorrow's lesson on fractions .",
      "Before sunrise {name} milked the cows , then drove the tractor out to plough the north field .",
      "{name} checked the fuel , spoke to the tower and took the plane up through the clouds ."]),
    ("Why did {name} sell the car ?",
     ["{He} needed the money .", "{He} moved to a city with good trains .", "It kept breaking down .", "{He} bought a bigger one ."],
     ["The rent went up again and {name} could not pay it after losing {his} job in March .",
      "Since taking the flat in Vienna , {name} gets everywhere by tram and underground , and parking costs a fortune .",
      "In one winter the garage replaced {name}'s battery , gearbox and brakes , and it still would not start on cold days .",
      "With the twins on the way , {name} needed room for two child seats and a pram ."]),
    ("What did {name} most likely do after the call ?",
     ["{He} packed a bag and drove to the airport .", "{He} cooked dinner for guests .", "{He} went to the bank .", "{He} cancelled the party ."],
     ["The call was from {his} sister abroad , asking {him} to come on the first flight because their father was ill .",
      "The caller told {name} that the whole family would arrive at seven and was looking forward to a good meal .",
      "The caller said someone had used {his} card in another country , and {he} had to sign the forms in person .",
      "The caller told {name} that the hall had flooded and that none of the musicians could come on Saturday ."]),
    ("Why is {name} carrying a heavy box ?",
     ["{He} is moving house .", "{He} is taking books to the library .", "{He} is delivering a parcel .", "{He} is bringing a gift to a wedding ."],
     ["{name}'s flat is nearly empty now ; only a lamp and the mattress are left , and the van is waiting outside .",
      "The box is full of novels that {name} borrowed over the winter , all due back today .",
      "{name} wears the courier's yellow jacket and checks the address on the label against the door numbers .",
      "{name} is in a suit , and the box is wrapped in white paper with a silver ribbon for the bride and groom ."]),
    ("What was the weather probably like ?",
     ["Very hot .", "Freezing cold .", "Windy .", "Foggy ."],
     ["{name} drank three bottles of water before noon and sat in the shade of the wall all afternoon .",
      "The pond had a thick crust of ice , and {name} could not feel {his} fingers inside two pairs of gloves .",
      "{name}'s hat flew off on the hill , and the washing on the line stood straight out sideways .",
      "{name} could not see the end of the street , and the ferry stayed in the harbour because the captain could not see the buoys ."]),
    ("Why did {name} laugh ?",
     ["The dog had stolen the sausages .", "{His} friend told a joke .", "{He} was nervous .", NONE],
     ["When {name} turned around , the plate on the barbecue was empty and the terrier was running off with something pink in its mouth .",
      "Over lunch , Omar told the story of the priest , the parrot and the lost umbrella , and {name} nearly choked on {his} soup .",
      "Waiting outside the interview room , {name} kept giggling at nothing and could not stop {his} hands shaking .",
      "{name} read the news quietly at breakfast , then folded the paper and went out ."]),
    ("What does {name} need most right now ?",
     ["Some sleep .", "A glass of water .", "A map .", "A warm coat ."],
     ["{name} has been driving through the night and {his} eyes keep closing at the wheel .",
      "After the long run in the sun {name}'s mouth is dry and {his} head is spinning .",
      "In the unknown town every street looks the same to {name} , and {his} phone battery is dead .",
      "{name} is shivering at the bus stop in a thin shirt while the first snow starts to fall ."]),
    ("Why did {name} move to the countryside ?",
     ["To find a quieter life .", "To take over the family farm .", "To be near {his} grandchildren .", "Because houses were cheaper ."],
     ["After twenty years of sirens , traffic and noisy neighbours in the city , {name} wanted to hear birds in the morning .",
      "When {his} father retired , there was nobody else to keep the orchard and the sheep going .",
      "{name}'s daughter and her two small boys live in the village , and {name} wanted to see them every day .",
      "For the price of a small flat in town , {name} could buy a cottage with four rooms and a garden ."]),
    ("What happened to the cake ?",
     ["It burned in the oven .", "The children ate it .", "It was dropped on the floor .", "It was never baked ."],
     ["Smoke was pouring out of the kitchen because {name} had forgotten the timer while on the phone .",
      "When {name} came back from the shop there were only crumbs on the plate and three small faces covered in cream .",
      "{name} tripped on the rug while carrying it to the table , and it landed upside down on the tiles .",
      "{name} found that there was no flour in the house and the shops were closed for the holiday ."]),
    ("Why did {name} stay at home ?",
     ["{He} was ill .", "{He} was waiting for a delivery .", "{His} car would not start .", "{He} had to look after the baby ."],
     ["{name} had a fever all night and could barely get out of bed .",
      "{name}'s new washing machine was due between eight and six , and someone had to sign for it .",
      "{name} turned the key again and again , but the engine only coughed and died .",
      "The nanny was away , and {name}'s partner had an early shift at the hospital ."]),
    ("What is {name} probably going to cook ?",
     ["Soup .", "Pancakes .", "A fish stew .", "A birthday cake ."],
     ["{name} has chopped carrots , onions and leeks and put a big pot of water on the stove .",
      "{name} has eggs , milk and flour in a bowl and the frying pan is heating for breakfast .",
      "{name} has just come back from the harbour with cod and mussels and is peeling potatoes .",
      "{name} has bought candles shaped like a seven and a tub of chocolate icing for {his} son's party ."]),
    ("Why did {name} apologise ?",
     ["{He} had broken a vase .", "{He} had forgotten a birthday .", "{He} had arrived very late .", "{He} had been rude to a waiter ."],
     ["At the dinner {name} knocked the shelf with {his} elbow , and the blue pot from China fell in pieces .",
      "{name} saw the photos of Maria's party the next day and realised {he} had not even sent a card .",
      "Everyone had finished eating and the band was packing up when {name} finally walked in .",
      "{name} had snapped at the young man who brought the wrong soup , and saw him almost in tears afterwards ."]),
    ("What is the most likely reason the shop was closed ?",
     ["It was a public holiday .", "The owner was ill .", "It had gone out of business .", "There was a power cut ."],
     ["The streets were full of flags and the town band was playing for the national day .",
      "A note on the door in shaky handwriting said that Mr Silva had the flu and would be back next week .",
      "The windows were covered with paper and a sign said that the building was for rent .",
      "Every light on the street was out , the traffic lights were dark and the tills could not work ."]),
    ("What did {name} likely find in the attic ?",
     ["Old letters from {his} grandmother .", "A family of mice .", "A leak in the roof .", "Nothing at all ."],
     ["{name} sat up there for hours reading the faded notes that had been sent from Naples during the war .",
      "Behind the boxes {name} saw chewed papers , small droppings and a nest of shredded cloth .",
      "{name} saw a dark wet patch on the wooden beams , right under a gap where daylight came through .",
      "{name} climbed up with a torch , but the floor was bare and swept clean ."]),
    ("Why was {name} so tired ?",
     ["{He} had worked a double shift .", "The baby cried all night .", "{He} had walked up the mountain .", "{He} had just flown in from Japan ."],
     ["{name} had started at the factory at six in the morning and left at eleven at night .",
      "{name}'s little Sofia had a tooth coming and woke up screaming every hour until dawn .",
      "{name} had climbed two thousand metres on foot , carrying a tent and food for three days .",
      "After fourteen hours in the air and a nine-hour time difference , {name} did not know if it was day or night ."]),
    ("Why did {name} bring an umbrella ?",
     ["The forecast said rain .", "{He} wanted shade from the sun .", "{He} was returning it to a friend .", "It was part of {his} costume ."],
     ["{name} heard on the radio that heavy showers would start around lunchtime .",
      "The beach had no trees , and {name} burns after ten minutes in strong light .",
      "{name} had borrowed it from Lucia last week and promised to give it back today .",
      "{name} was dressed as an English gentleman for the fancy dress party , with a bowler hat ."]),
    ("How did {name} probably get to the island ?",
     ["By ferry .", "{He} swam .", "By helicopter .", "{He} walked across at low tide ."],
     ["{name} bought a ticket at the harbour and sat on deck watching the gulls for two hours .",
      "{name} put on a wetsuit and goggles and crossed the narrow channel in forty minutes .",
      "{name} heard the blades roaring overhead and had to wear headphones for the short flight .",
      "When the sea went out , a path of sand appeared , and {name} crossed it in boots before the water returned ."]),
    ("Why did {name} change jobs ?",
     ["For a higher salary .", "To work closer to home .", "{He} did not get on with {his} boss .", "To learn something new ."],
     ["The new company offered {name} almost twice as much money for the same kind of work .",
      "{name} used to spend three hours a day in traffic , and the new office is a five-minute walk from {his} door .",
      "{name}'s manager shouted at {him} in meetings and took the credit for {his} ideas .",
      "After ten years of doing the same accounts , {name} wanted to try designing websites ."]),
    ("What will {name} probably do this weekend ?",
     ["Go fishing .", "Paint the bedroom .", "Visit {his} parents .", "Study for an exam ."],
     ["{name} has checked {his} rods , bought fresh bait and looked up the best spots on the river .",
      "{name} has bought two tins of pale yellow and covered the bed and the floor with old sheets .",
      "{name}'s mother phoned to ask whether {he} would still come for Sunday lunch in the village .",
      "The history test is on Monday morning and {name} has not opened the book yet ."]),
    ("Why was the street so crowded ?",
     ["There was a parade .", "A famous singer was signing albums .", "A fire had closed the main road .", "It was the first day of the sales ."],
     ["Drums and trumpets could be heard , and decorated floats were moving slowly toward the square .",
      "A long line of fans stretched from the door of the record shop around the corner .",
      "Firemen were still spraying water on the burnt bakery , and all the traffic had been sent through the side streets .",
      "The department stores had put up signs offering half price on everything , and people were waiting before they opened ."]),
    ("What will {name} probably do with the money ?",
     ["Pay off {his} debts .", "Go on holiday .", "Give it to charity .", NONE],
     ["{name} owes the bank a large sum and the letters about it have been getting angrier .",
      "{name} has been looking at pictures of beaches in Greece and asking about flights .",
      "{name} has always helped at the food bank and says they need it more than {he} does .",
      "{name} has not yet decided anything and has put the envelope in a drawer ."]),
    ("Why did {name} call the doctor ?",
     ["{His} son had a high fever .", "{He} needed a new prescription .", "{He} wanted to cancel an appointment .", "{He} had hurt {his} ankle ."],
     ["{name}'s little Leo was burning hot , would not eat , and the thermometer showed forty degrees .",
      "{name}'s heart pills had run out and the pharmacy could not give more without a paper .",
      "{name} had a meeting on Thursday morning at the same time as the check-up .",
      "{name} fell on the ice and could not put any weight on {his} left foot ."]),
    ("What was {name} probably doing in the garden ?",
     ["Planting flowers .", "Looking for a ball .", "Having a picnic .", "Fixing the fence ."],
     ["{name} was kneeling by the beds with a trowel and a tray of small tulips .",
      "The children had kicked it over the hedge , and {name} was searching under every bush .",
      "{name} had spread a blanket on the grass with sandwiches , lemonade and strawberries .",
      "{name} had a hammer , a box of nails and some new boards where the wind had knocked the old ones down ."]),
    ("Why did {name} wake up early ?",
     ["{He} had a flight to catch .", "The neighbours were making noise .", "{He} wanted to see the sunrise .", "The dog needed to go out ."],
     ["{name}'s plane to Madrid left at seven , and the airport was an hour away .",
      "At five the builders next door to {name} started drilling into the wall .",
      "{name} had heard that the view from the hill at dawn was spectacular and set off in the dark .",
      "{name}'s dog Rex was scratching at the door and whining to be let into the yard ."]),
    ("What is the most likely reason {name} is smiling ?",
     ["{He} passed {his} driving test .", "{His} friend sent a funny video .", "{He} found money in {his} coat .", "{He} is about to become a father ."],
     ["The examiner handed {name} the pink form and said {he} could drive alone from today .",
      "{name} was watching a clip on {his} phone of a goat jumping on a trampoline .",
      "Reaching into the pocket of the old jacket , {name} pulled out a twenty euro note from last winter .",
      "{name}'s wife has just shown {him} the test , and the baby is due in the spring ."]),
    ("Why did the teacher keep {name} after class ?",
     ["{He} had not done {his} homework .", "{He} had won a writing competition .", "{He} had been fighting .", "{He} needed help with reading ."],
     ["For the third week running , {name} came with an empty exercise book and no excuse .",
      "The teacher wanted to tell {name} privately that {his} story had been chosen as the best in the region .",
      "{name} had a torn shirt and a scratch on the cheek after the trouble with Ali at break .",
      "{name} still struggles to follow the words on the page , and the teacher wanted to give {him} extra lessons ."]),
    ("What is probably the reason {name} is saving money ?",
     ["To buy a house .", "To pay for university .", "To start a business .", "To travel around the world ."],
     ["{name} and {his} partner have been visiting estate agents every Saturday .",
      "{name} has been accepted to study medicine next autumn and the fees are high .",
      "{name} wants to open a small bakery on the corner and has already talked to the landlord .",
      "{name} has a map on the wall with pins in Peru , India and New Zealand ."]),
]
SPLITS = {"train.jsonl": 20, "valid.jsonl": 6, "test.jsonl": 6}  # frames per split


def fill(text: str, name: str, gender: str) -> str:
    return text.format(name=name, **PRONOUNS[gender])


def main() -> None:
    assert len(FRAMES) == sum(SPLITS.values()) and all(
        len(answers) == len(contexts) == 4 for _, answers, contexts in FRAMES)
    rng = random.Random(SEED)
    frames = list(FRAMES)
    rng.shuffle(frames)
    out = Path(__file__).parent
    start = 0
    for file_name, count in SPLITS.items():
        lines = []
        for number, (question, answers, contexts) in enumerate(frames[start:start + count]):
            for k, context in enumerate(contexts):
                name, gender = NAMES[rng.randrange(len(NAMES))]
                position = (number + k) % 4  # the right answer's slot: balanced over 0-3
                others = [i for i in range(4) if i != k]
                rng.shuffle(others)
                order = others[:position] + [k] + others[position:]
                record = {"context": fill(context, name, gender), "question": fill(question, name, gender)}
                record["id"] = hashlib.sha1(json.dumps(record).encode()).hexdigest()[:30].upper() + "##q1_a1"
                for slot, i in enumerate(order):
                    record[f"answer{slot}"] = fill(answers[i], name, gender)
                if file_name != "test.jsonl":  # the real test file is unlabelled
                    record["label"] = position
                lines.append(json.dumps({"id": record.pop("id"), **record}, ensure_ascii=False))
        start += count
        (out / file_name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
