"""Write the sample T-REx files of this folder (run from the repository root).

    python data/sample/trex/generate.py

Not needed at run time: the .json files it writes are committed. The documents are
in the exact format of the T-REx dump (docid, uri, title, text, sentences_boundaries,
words_boundaries, entities, triples), with our own sentences about real facts.
Triples are made the way T-REx's aligners make them:

- Simple-Aligner: every pair of entity mentions in one sentence whose (subject,
  predicate, object) is a fact of the small knowledge base below;
- SPOAligner: the same triple again when the sentence also contains a word for the
  predicate (it then carries the predicate's boundaries), so duplicates occur;
- NoSubject-Triple-aligner: facts of the document's own entity whose object is in a
  sentence; the subject is that sentence's mention of it, or else none (null
  boundaries) or the document's first mention (outside the sentence).

Output is deterministic (no randomness beyond a fixed-seed template choice).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENTITY = "http://www.wikidata.org/entity/"
PROP = "http://www.wikidata.org/prop/direct/"
DATE = "^^http://www.w3.org/2001/XMLSchema#dateTime"

# --- entities: key -> (Q-id, surface form) -------------------------------------------
E: dict[str, tuple[str, str]] = {}


def ent(key: str, qid: str, name: str | None = None) -> str:
    E[key] = (qid, name or key)
    return key


# Countries, capitals (Q-ids cross-checked against a public country/capital table).
COUNTRIES = [
    # name, Q, capital, Q, continent, languages, currency, borders, member of
    ("France", "Q142", "Paris", "Q90", ["Europe"], ["French"], "euro",
     ["Spain", "Belgium", "Luxembourg", "Germany", "Switzerland", "Italy", "Andorra"],
     ["European Union", "NATO", "United Nations"]),
    ("Germany", "Q183", "Berlin", "Q64", ["Europe"], ["German"], "euro",
     ["Denmark", "Poland", "Czech Republic", "Austria", "Switzerland", "France",
      "Luxembourg", "Belgium", "Netherlands"], ["European Union", "NATO", "United Nations"]),
    ("United Kingdom", "Q145", "London", "Q84", ["Europe"], ["English"], "pound sterling",
     ["Ireland"], ["NATO", "United Nations"]),
    ("Italy", "Q38", "Rome", "Q220", ["Europe"], ["Italian"], "euro",
     ["France", "Switzerland", "Austria", "Slovenia"], ["European Union", "NATO", "United Nations"]),
    ("Spain", "Q29", "Madrid", "Q2807", ["Europe"], ["Spanish"], "euro",
     ["France", "Portugal", "Andorra"], ["European Union", "NATO", "United Nations"]),
    ("Portugal", "Q45", "Lisbon", "Q597", ["Europe"], ["Portuguese"], "euro",
     ["Spain"], ["European Union", "NATO", "United Nations"]),
    ("Netherlands", "Q55", "Amsterdam", "Q727", ["Europe"], ["Dutch"], "euro",
     ["Belgium", "Germany"], ["European Union", "NATO", "United Nations"]),
    ("Belgium", "Q31", "Brussels", "Q239", ["Europe"], ["Dutch", "French", "German"], "euro",
     ["France", "Luxembourg", "Germany", "Netherlands"], ["European Union", "NATO", "United Nations"]),
    ("Luxembourg", "Q32", "Luxembourg City", "Q1842", ["Europe"], ["French", "German"], "euro",
     ["Belgium", "Germany", "France"], ["European Union", "NATO", "United Nations"]),
    ("Switzerland", "Q39", "Bern", "Q70", ["Europe"], ["German", "French", "Italian"],
     "Swiss franc", ["Germany", "France", "Italy", "Austria"], ["United Nations"]),
    ("Austria", "Q40", "Vienna", "Q1741", ["Europe"], ["German"], "euro",
     ["Germany", "Czech Republic", "Slovakia", "Hungary", "Slovenia", "Italy", "Switzerland"],
     ["European Union", "United Nations"]),
    ("Poland", "Q36", "Warsaw", "Q270", ["Europe"], ["Polish"], None,
     ["Germany", "Czech Republic", "Slovakia", "Ukraine", "Belarus", "Lithuania", "Russia"],
     ["European Union", "NATO", "United Nations"]),
    ("Czech Republic", "Q213", "Prague", "Q1085", ["Europe"], ["Czech"], None,
     ["Germany", "Poland", "Slovakia", "Austria"], ["European Union", "NATO", "United Nations"]),
    ("Hungary", "Q28", "Budapest", "Q1781", ["Europe"], ["Hungarian"], None,
     ["Austria", "Slovakia", "Ukraine", "Croatia", "Slovenia"],
     ["European Union", "NATO", "United Nations"]),
    ("Denmark", "Q35", "Copenhagen", "Q1748", ["Europe"], ["Danish"], None,
     ["Germany"], ["European Union", "NATO", "United Nations"]),
    ("Sweden", "Q34", "Stockholm", "Q1754", ["Europe"], ["Swedish"], "Swedish krona",
     ["Norway", "Finland"], ["European Union", "NATO", "United Nations"]),
    ("Norway", "Q20", "Oslo", "Q585", ["Europe"], ["Norwegian"], "Norwegian krone",
     ["Sweden", "Finland", "Russia"], ["NATO", "United Nations"]),
    ("Finland", "Q33", "Helsinki", "Q1757", ["Europe"], ["Finnish", "Swedish"], "euro",
     ["Sweden", "Norway", "Russia"], ["European Union", "NATO", "United Nations"]),
    ("Ireland", "Q27", "Dublin", "Q1761", ["Europe"], ["Irish", "English"], "euro",
     ["United Kingdom"], ["European Union", "United Nations"]),
    ("Greece", "Q41", "Athens", "Q1524", ["Europe"], ["Greek"], "euro",
     ["Turkey"], ["European Union", "NATO", "United Nations"]),
    ("Andorra", "Q228", "Andorra la Vella", "Q1863", ["Europe"], ["Catalan"], "euro",
     ["France", "Spain"], ["United Nations"]),
    ("Russia", "Q159", "Moscow", "Q649", ["Europe", "Asia"], ["Russian"], None,
     ["Norway", "Finland", "Estonia", "Latvia", "Lithuania", "Poland", "Belarus", "Ukraine",
      "China"], ["United Nations"]),
    ("Belarus", "Q184", "Minsk", "Q2280", ["Europe"], ["Belarusian", "Russian"], None,
     ["Poland", "Lithuania", "Latvia", "Russia", "Ukraine"], ["United Nations"]),
    ("Ukraine", "Q212", "Kyiv", "Q1899", ["Europe"], ["Ukrainian"], None,
     ["Russia", "Belarus", "Poland", "Slovakia", "Hungary"], ["United Nations"]),
    ("Slovakia", "Q214", "Bratislava", "Q1780", ["Europe"], ["Slovak"], "euro",
     ["Czech Republic", "Poland", "Ukraine", "Hungary", "Austria"],
     ["European Union", "NATO", "United Nations"]),
    ("Slovenia", "Q215", "Ljubljana", "Q437", ["Europe"], ["Slovene"], "euro",
     ["Italy", "Austria", "Hungary", "Croatia"], ["European Union", "NATO", "United Nations"]),
    ("Croatia", "Q224", "Zagreb", "Q1435", ["Europe"], ["Croatian"], "euro",
     ["Slovenia", "Hungary"], ["European Union", "NATO", "United Nations"]),
    ("Estonia", "Q191", "Tallinn", "Q1770", ["Europe"], ["Estonian"], "euro",
     ["Latvia", "Russia"], ["European Union", "NATO", "United Nations"]),
    ("Latvia", "Q211", "Riga", "Q1773", ["Europe"], ["Latvian"], "euro",
     ["Estonia", "Lithuania", "Belarus", "Russia"], ["European Union", "NATO", "United Nations"]),
    ("Lithuania", "Q37", "Vilnius", "Q216", ["Europe"], ["Lithuanian"], "euro",
     ["Latvia", "Belarus", "Poland", "Russia"], ["European Union", "NATO", "United Nations"]),
    ("Turkey", "Q43", "Ankara", "Q3640", ["Europe", "Asia"], ["Turkish"], None,
     ["Greece"], ["NATO", "United Nations"]),
    ("Japan", "Q17", "Tokyo", "Q1490", ["Asia"], ["Japanese"], "Japanese yen",
     [], ["United Nations"]),
    ("China", "Q148", "Beijing", "Q956", ["Asia"], [], "renminbi",
     ["Russia", "India"], ["United Nations"]),
    ("India", "Q668", "New Delhi", "Q987", ["Asia"], ["Hindi", "English"], None,
     ["China"], ["United Nations"]),
    ("South Korea", "Q884", "Seoul", "Q8684", ["Asia"], ["Korean"], None, [], ["United Nations"]),
    ("Canada", "Q16", "Ottawa", "Q1930", ["North America"], ["English", "French"], None,
     ["United States"], ["NATO", "United Nations"]),
    ("United States", "Q30", "Washington, D.C.", "Q61", ["North America"], [], "United States dollar",
     ["Canada", "Mexico"], ["NATO", "United Nations"]),
    ("Mexico", "Q96", "Mexico City", "Q1489", ["North America"], [], None,
     ["United States"], ["United Nations"]),
    ("Brazil", "Q155", "Brasília", "Q2844", ["South America"], ["Portuguese"], None,
     ["Argentina", "Peru", "Colombia"], ["United Nations"]),
    ("Argentina", "Q414", "Buenos Aires", "Q1486", ["South America"], ["Spanish"], None,
     ["Chile", "Brazil"], ["United Nations"]),
    ("Chile", "Q298", "Santiago", "Q2887", ["South America"], ["Spanish"], None,
     ["Peru", "Argentina"], ["United Nations"]),
    ("Peru", "Q419", "Lima", "Q2868", ["South America"], ["Spanish"], None,
     ["Colombia", "Brazil", "Chile"], ["United Nations"]),
    ("Colombia", "Q739", "Bogotá", "Q2841", ["South America"], ["Spanish"], None,
     ["Brazil", "Peru"], ["United Nations"]),
    ("Egypt", "Q79", "Cairo", "Q85", ["Africa"], ["Arabic"], None, [], ["United Nations"]),
    ("Kenya", "Q114", "Nairobi", "Q3870", ["Africa"], ["Swahili", "English"], None, [],
     ["United Nations"]),
    ("Morocco", "Q1028", "Rabat", "Q3551", ["Africa"], ["Arabic"], None, [], ["United Nations"]),
    ("Australia", "Q408", "Canberra", "Q3114", [], [], "Australian dollar", [], ["United Nations"]),
    # The city-state is its own capital: its sentences give same-entity triples.
    ("Singapore", "Q334", "Singapore", "Q334", ["Asia"], ["English"], None, [], ["United Nations"]),
]
for row in COUNTRIES:
    ent(row[0], row[1])
    ent(row[2], row[3])
for key, qid in [
    ("Europe", "Q46"), ("Asia", "Q48"), ("Africa", "Q15"), ("North America", "Q49"),
    ("South America", "Q18"),
    ("French", "Q150"), ("German", "Q188"), ("English", "Q1860"), ("Italian", "Q652"),
    ("Spanish", "Q1321"), ("Portuguese", "Q5146"), ("Dutch", "Q7411"), ("Polish", "Q809"),
    ("Czech", "Q9056"), ("Hungarian", "Q9067"), ("Danish", "Q9035"), ("Swedish", "Q9027"),
    ("Norwegian", "Q9043"), ("Finnish", "Q1412"), ("Irish", "Q9142"), ("Greek", "Q9129"),
    ("Catalan", "Q7026"), ("Russian", "Q7737"), ("Belarusian", "Q9091"),
    ("Ukrainian", "Q8798"), ("Slovak", "Q9058"), ("Slovene", "Q9063"), ("Croatian", "Q6654"),
    ("Estonian", "Q9072"), ("Latvian", "Q9078"), ("Lithuanian", "Q9083"), ("Turkish", "Q256"),
    ("Japanese", "Q5287"), ("Hindi", "Q1568"), ("Korean", "Q9176"), ("Arabic", "Q13955"),
    ("Swahili", "Q7838"),
    ("euro", "Q4916"), ("pound sterling", "Q25224"), ("Swiss franc", "Q25344"),
    ("Swedish krona", "Q122922"), ("Norwegian krone", "Q132643"), ("Japanese yen", "Q8146"),
    ("renminbi", "Q39099"), ("United States dollar", "Q4917"), ("Australian dollar", "Q259502"),
    ("European Union", "Q458"), ("NATO", "Q7184"), ("United Nations", "Q1065"),
    ("country", "Q6256"), ("city", "Q515"),
    # occupations
    ("physicist", "Q169470"), ("mathematician", "Q170790"), ("chemist", "Q593644"),
    ("composer", "Q36834"), ("pianist", "Q486748"), ("painter", "Q1028181"),
    ("writer", "Q36180"), ("poet", "Q49757"), ("philosopher", "Q4964182"),
    ("politician", "Q82955"), ("astronomer", "Q11063"), ("playwright", "Q214917"),
    ("novelist", "Q6625963"), ("actress", "Q33999"),
    # other places
    ("Ulm", "Q3012"), ("Princeton", "Q138518"), ("Salzburg", "Q34713"), ("Bonn", "Q586"),
    ("Eisenach", "Q7070"), ("Leipzig", "Q2079"), ("Trier", "Q3138"), ("Portsmouth", "Q72259"),
    ("Besançon", "Q37776"), ("Florence", "Q2044"), ("Pisa", "Q13375"), ("Málaga", "Q8851"),
    ("Hamburg", "Q1055"), ("Honolulu", "Q18094"), ("Cambridge", "Q350"),
    ("Santa Barbara", "Q159288"), ("Frankfurt", "Q1794"), ("Weimar", "Q3955"),
    ("Odense", "Q25331"), ("Sanremo", "Q33962"), ("New York City", "Q60"), ("Zürich", "Q72"),
    ("Geneva", "Q71"), ("Kyoto", "Q34600"), ("Kolkata", "Q1348"),
    ("Saint Petersburg", "Q656"), ("Uppsala", "Q25286"),
]:
    ent(key, qid)
ent("Mexico", "Q96")

# --- facts (subject key, P-id, object key) ---------------------------------------------
FACTS: set[tuple[str, str, str]] = set()
for (country, _, capital, _, continents, languages, currency, borders, orgs) in COUNTRIES:
    FACTS.add((country, "P36", capital))
    FACTS.add((capital, "P17", country))
    FACTS.add((country, "P31", "country"))
    FACTS.add((capital, "P31", "city"))
    FACTS.update((country, "P30", c) for c in continents)
    FACTS.update((country, "P37", lang) for lang in languages)
    if currency:
        FACTS.add((country, "P38", currency))
    for other in borders:
        FACTS.add((country, "P47", other))
        FACTS.add((other, "P47", country))
    FACTS.update((country, "P463", org) for org in orgs)
CITY_COUNTRY = {
    "Ulm": "Germany", "Bonn": "Germany", "Eisenach": "Germany", "Leipzig": "Germany",
    "Trier": "Germany", "Hamburg": "Germany", "Frankfurt": "Germany", "Weimar": "Germany",
    "Salzburg": "Austria", "Portsmouth": "United Kingdom", "Cambridge": "United Kingdom",
    "Besançon": "France", "Florence": "Italy", "Pisa": "Italy", "Sanremo": "Italy",
    "Málaga": "Spain", "Odense": "Denmark", "Uppsala": "Sweden", "Zürich": "Switzerland",
    "Geneva": "Switzerland", "Kyoto": "Japan", "Kolkata": "India",
    "Saint Petersburg": "Russia", "Princeton": "United States", "Honolulu": "United States",
    "Santa Barbara": "United States", "New York City": "United States",
}
# Twin cities: a relation with two pairs only, which the relation filter (3+) removes.
TWINS = {"Paris": "Rome", "Rome": "Paris"}
FACTS.update((a, "P190", b) for a, b in TWINS.items())
for city, country in CITY_COUNTRY.items():
    FACTS.add((city, "P17", country))
    FACTS.add((city, "P31", "city"))

# People: key, Q, pronoun, birth (place, date, surface), death place, citizenships, occupations
PEOPLE = [
    ("Albert Einstein", "Q937", "He", ("Ulm", "1879-03-14", "14 March 1879"), "Princeton",
     ["Switzerland", "United States"], ["physicist"]),
    ("Marie Curie", "Q7186", "She", ("Warsaw", "1867-11-07", "7 November 1867"), None,
     ["Poland", "France"], ["physicist", "chemist"]),
    ("Wolfgang Amadeus Mozart", "Q254", "He", ("Salzburg", "1756-01-27", "27 January 1756"),
     "Vienna", [], ["composer", "pianist"]),
    ("Ludwig van Beethoven", "Q255", "He", ("Bonn", None, None), "Vienna", [],
     ["composer", "pianist"]),
    ("Johann Sebastian Bach", "Q1339", "He", ("Eisenach", "1685-03-31", "31 March 1685"),
     "Leipzig", [], ["composer"]),
    ("Franz Schubert", "Q7312", "He", (None, "1797-01-31", "31 January 1797"), "Vienna", [],
     ["composer"]),
    ("Gustav Mahler", "Q7304", "He", (None, "1860-07-07", "7 July 1860"), "Vienna",
     ["Austria"], ["composer"]),
    ("Antonín Dvořák", "Q7298", "He", (None, "1841-09-08", "8 September 1841"), "Prague", [],
     ["composer"]),
    ("Karl Marx", "Q9061", "He", ("Trier", "1818-05-05", "5 May 1818"), "London", [],
     ["philosopher"]),
    ("Charles Dickens", "Q5686", "He", ("Portsmouth", "1812-02-07", "7 February 1812"), None,
     ["United Kingdom"], ["writer", "novelist"]),
    ("Victor Hugo", "Q535", "He", ("Besançon", "1802-02-26", "26 February 1802"), "Paris",
     ["France"], ["writer", "poet"]),
    ("Fyodor Dostoevsky", "Q991", "He", ("Moscow", "1821-11-11", "11 November 1821"),
     "Saint Petersburg", [], ["writer", "novelist"]),
    ("Alexander Pushkin", "Q7200", "He", ("Moscow", "1799-06-06", "6 June 1799"),
     "Saint Petersburg", [], ["poet"]),
    ("Dante Alighieri", "Q1067", "He", ("Florence", None, None), None, [], ["poet"]),
    ("Galileo Galilei", "Q307", "He", ("Pisa", "1564-02-15", "15 February 1564"), None, [],
     ["astronomer", "physicist"]),
    ("Pablo Picasso", "Q5593", "He", ("Málaga", "1881-10-25", "25 October 1881"), None,
     ["Spain"], ["painter"]),
    ("Claude Monet", "Q296", "He", ("Paris", "1840-11-14", "14 November 1840"), None,
     ["France"], ["painter"]),
    ("Vincent van Gogh", "Q5582", "He", (None, "1853-03-30", "30 March 1853"), None,
     ["Netherlands"], ["painter"]),
    ("Ada Lovelace", "Q7259", "She", ("London", "1815-12-10", "10 December 1815"), None,
     ["United Kingdom"], ["mathematician"]),
    ("Angela Merkel", "Q567", "She", ("Hamburg", "1954-07-17", "17 July 1954"), None,
     ["Germany"], ["politician"]),
    ("Barack Obama", "Q76", "He", ("Honolulu", "1961-08-04", "4 August 1961"), None,
     ["United States"], ["politician"]),
    ("Douglas Adams", "Q42", "He", ("Cambridge", "1952-03-11", "11 March 1952"),
     "Santa Barbara", ["United Kingdom"], ["writer"]),
    ("Johann Wolfgang von Goethe", "Q5879", "He", ("Frankfurt", "1749-08-28", "28 August 1749"),
     "Weimar", [], ["writer", "poet"]),
    ("Hans Christian Andersen", "Q5673", "He", ("Odense", "1805-04-02", "2 April 1805"),
     "Copenhagen", ["Denmark"], ["writer"]),
    ("Søren Kierkegaard", "Q6512", "He", ("Copenhagen", "1813-05-05", "5 May 1813"),
     "Copenhagen", ["Denmark"], ["philosopher"]),
    ("Henrik Ibsen", "Q36661", "He", (None, "1828-03-20", "20 March 1828"), "Oslo",
     ["Norway"], ["playwright"]),
    ("Alfred Nobel", "Q23810", "He", ("Stockholm", "1833-10-21", "21 October 1833"), "Sanremo",
     ["Sweden"], ["chemist"]),
    ("Greta Garbo", "Q5443", "She", ("Stockholm", "1905-09-18", "18 September 1905"),
     "New York City", ["Sweden", "United States"], ["actress"]),
    ("James Joyce", "Q6882", "He", ("Dublin", "1882-02-02", "2 February 1882"), "Zürich",
     ["Ireland"], ["writer", "novelist"]),
    ("Oscar Wilde", "Q30875", "He", ("Dublin", "1854-10-16", "16 October 1854"), "Paris",
     ["Ireland"], ["writer", "playwright", "poet"]),
    ("Jorge Luis Borges", "Q909", "He", ("Buenos Aires", "1899-08-24", "24 August 1899"),
     "Geneva", ["Argentina"], ["writer", "poet"]),
    ("Franz Kafka", "Q905", "He", ("Prague", "1883-07-03", "3 July 1883"), None, [],
     ["writer", "novelist"]),
    ("Haruki Murakami", "Q134798", "He", ("Kyoto", "1949-01-12", "12 January 1949"), None,
     ["Japan"], ["writer", "novelist"]),
    ("Rabindranath Tagore", "Q7241", "He", ("Kolkata", "1861-05-07", "7 May 1861"), "Kolkata",
     ["India"], ["poet", "writer"]),
    ("Carl Linnaeus", "Q1043", "He", (None, "1707-05-23", "23 May 1707"), "Uppsala",
     ["Sweden"], []),
    ("Gabriel García Márquez", "Q5878", "He", (None, "1927-03-06", "6 March 1927"),
     "Mexico City", ["Colombia"], ["writer", "novelist"]),
]
for (name, qid, _, (birthplace, _, _), deathplace, citizenships, occupations) in PEOPLE:
    ent(name, qid)
    if birthplace:
        FACTS.add((name, "P19", birthplace))
    if deathplace:
        FACTS.add((name, "P20", deathplace))
    FACTS.update((name, "P27", c) for c in citizenships)
    FACTS.update((name, "P106", o) for o in occupations)
    FACTS.add((name, "P31", "human"))
ent("human", "Q5")
LIVING = {"Angela Merkel", "Barack Obama", "Haruki Murakami"}
BIRTH_DATES = {p[0]: p[3][1] for p in PEOPLE if p[3][1]}
# Words that make the SPOAligner fire (it also records their boundaries).
PREDICATE_WORDS = {
    "P36": ["capital"], "P17": ["capital", "city in", "located in"], "P37": ["language"],
    "P38": ["currency"], "P47": ["border"], "P463": ["member"], "P19": ["born"],
    "P20": ["died"], "P27": ["citizen"], "P30": ["continent"],
}

# --- sentence templates: {X}/{Y} are the document entity and an object; {It} a pronoun --
T_COUNTRY_OPEN = [
    "{X} is a {country} in {C}.",
    "{X} is a sovereign {country} located in {C}.",
    "{X} is a {country} on the continent of {C}.",
]
T_COUNTRY_OPEN_NOCONT = ["{X} is a {country} in the Southern Hemisphere."]
T_CAPITAL = [
    "The capital of {X} is {Y}.",
    "{Y} is the capital city of {X}.",
    "{X}'s capital city is {Y}.",
    "{Y} serves as the capital of {X}.",
    "{It} has {Y} as its capital.",
]
T_CAPITAL_NOSUBJ = ["The national capital is {Y}."]
T_LANGUAGE = [
    "{Y} is an official language of {X}.",
    "The official language of {X} is {Y}.",
    "In {X}, {Y} is used in schools, courts and parliament.",
    "{It} recognises {Y} as an official language.",
]
T_LANGUAGE2 = [
    "{Y} and {Z} are official languages of {X}.",
    "{X} recognises both {Y} and {Z} as official languages.",
]
T_CURRENCY = [
    "The currency of {X} is the {Y}.",
    "{X} uses the {Y} as its currency.",
    "Prices in {X} are given in the {Y}.",
    "{It} uses the {Y} as its official currency.",
]
T_CURRENCY_NOSUBJ = ["The official currency is the {Y}."]
T_BORDER = [
    "{X} shares land borders with {L}.",
    "{X} borders {L}.",
    "{It} has land borders with {L}.",
    "To travel overland from {X} one can cross into {L}.",
]
T_MEMBER = [
    "{X} is a member of {L}.",
    "{X} belongs to {L}.",
    "{It} is a member state of {L}.",
]
T_CITY_OPEN = [
    "{X} is a {city} in {Y}.",
    "{X} is a large {city} located in {Y}.",
]
T_PERSON_OPEN = [
    "{X} was {a} {L}.",
    "{X} was a famous {L}.",
    "{X} is remembered as {a} {L}.",
]
T_PERSON_OPEN_CITIZEN = [
    "{X} was {a} {L} from {Y}.",
    "{X} was {a} {L} and a citizen of {Y}.",
]
T_BIRTH = [
    "{X} was born in {Y}.",
    "{X} was born in {Y}, {Z}.",
    "{It} was born in the city of {Y}.",
    "{Y} is the birthplace of {X}.",
]
T_BIRTH_DATE = [
    "{X} was born in {Y} on {D}.",
    "{It} was born on {D} in {Y}.",
]
T_DATE_ONLY = ["{X} was born on {D}."]
T_DEATH = [
    "{X} died in {Y}.",
    "{It} died in {Y}, {Z}.",
    "{X} died in the city of {Y}.",
    "The death of {X} took place in {Y}.",
]
T_CITIZEN = [
    "{X} held {Y} citizenship.",
    "{It} was a citizen of {Y}.",
    "{X} became a citizen of {Y}.",
]
T_CITIZEN2 = ["{X} was a citizen of {Y} and of {Z}.", "{It} held citizenship of {Y} and {Z}."]


NEEDS_ARTICLE = {"United Kingdom", "United States", "Czech Republic", "Netherlands",
                 "European Union", "United Nations"}


class Writer:
    """Builds one document's text while recording exact mention offsets."""

    def __init__(self, docid_key: str):
        self.key = docid_key
        self.text = ""
        self.sentences: list[list[int]] = []
        self.mentions: list[dict] = []  # {key|uri, start, end, surface, annotator, sentence}

    def sentence(self, template: str, slots: dict[str, str | tuple]) -> None:
        start = len(self.text) + (1 if self.text else 0)
        if self.text:
            self.text += " "
        sentence_id = len(self.sentences)
        for piece in re.split(r"(\{\w+\})", template):
            name = piece[1:-1] if piece.startswith("{") and piece.endswith("}") else None
            if name is None:
                if piece.startswith(".") and self.text.endswith("."):  # "Washington, D.C."
                    piece = piece[1:]
                self.text += piece
                continue
            value = slots.get(name, name)
            if name in ("country", "city"):
                value = name
            if isinstance(value, list):  # "A, B and C"
                for i, item in enumerate(value):
                    if i:
                        self.text += " and " if i == len(value) - 1 else ", "
                    self._mention(item, sentence_id)
            else:
                self._mention(value, sentence_id)
        self.sentences.append([start, len(self.text)])

    def _mention(self, value, sentence_id: int) -> None:
        if isinstance(value, tuple):  # ("date", iso, surface) or ("pronoun", key, surface)
            kind, ref, surface = value
        else:
            kind, ref, surface = "entity", value, E[value][1]
        if kind == "entity" and ref in NEEDS_ARTICLE:  # "the United States", not a mention
            at_start = not self.text or self.text.endswith(". ")
            self.text += "The " if at_start else "the "
        start = len(self.text)
        self.text += surface
        self.add_mention(kind, ref, surface, start, sentence_id)

    def add_mention(self, kind: str, ref: str, surface: str, start: int, sentence_id: int) -> None:
        uri = f"{ref}T00:00:00Z{DATE}" if kind == "date" else ENTITY + E[ref][0]
        annotator = {"entity": "Wikidata_Spotlight_Entity_Linker", "pronoun": "Simple_Coreference",
                     "date": "Date_Linker"}[kind]
        self.mentions.append({"key": ref, "uri": uri, "start": start, "end": start + len(surface),
                              "surface": surface, "annotator": annotator,
                              "sentence": sentence_id})

    def document(self, index: int) -> dict:
        words = [[m.start(), m.end()] for m in re.finditer(r"\w+|[^\w\s]", self.text)]
        entities = [
            {"boundaries": [m["start"], m["end"]], "surfaceform": m["surface"], "uri": m["uri"],
             "annotator": m["annotator"]}
            for m in sorted(self.mentions, key=lambda m: (m["start"], m["end"]))
        ]
        return {
            "docid": ENTITY + E[self.key][0],
            "title": self.key,
            "text": self.text,
            "uri": ENTITY + E[self.key][0],
            "entities": entities,
            "words_boundaries": words,
            "triples": self._triples(index),
            "sentences_boundaries": self.sentences,
        }

    def _triples(self, index: int) -> list[dict]:
        def arg(m):
            return {"boundaries": [m["start"], m["end"]], "surfaceform": m["surface"],
                    "uri": m["uri"], "annotator": m["annotator"]}

        def triple(sid, s, p, o, annotator, pred_bounds=None):
            return {
                "sentence_id": sid,
                "predicate": {"boundaries": pred_bounds,
                              "surfaceform": None if pred_bounds is None
                              else self.text[pred_bounds[0]:pred_bounds[1]],
                              "uri": PROP + p, "annotator": annotator},
                "object": o, "dependency_path": None, "confidence": None, "subject": s,
                "annotator": annotator,
            }

        simple, spo, nosubj = [], [], []
        first = next(m for m in self.mentions if m["key"] == self.key)
        for sid, (a, b) in enumerate(self.sentences):
            here = [m for m in self.mentions if m["sentence"] == sid]
            sentence = self.text[a:b]
            for s in here:
                for o in here:
                    if o is s:
                        continue
                    for p in sorted({p for (x, p, y) in FACTS if x == s["key"] and y == o["key"]}):
                        simple.append(triple(sid, arg(s), p, arg(o), "Simple-Aligner"))
                        for word in PREDICATE_WORDS.get(p, []):
                            at = sentence.find(word)
                            if at >= 0:
                                spo.append(triple(sid, arg(s), p, arg(o), "SPOAligner",
                                                  [a + at, a + at + len(word)]))
                                break
                # dates: date of birth of the document's person
                if s["key"] == self.key and s["key"] in BIRTH_DATES:
                    for o in here:
                        if o["annotator"] == "Date_Linker" and o["key"] == BIRTH_DATES[s["key"]]:
                            simple.append(triple(sid, arg(s), "P569", arg(o), "Simple-Aligner"))
            # NoSubject: facts of the document's entity whose object is in this sentence
            own = [m for m in here if m["key"] == self.key]
            for o in here:
                for p in sorted({p for (x, p, y) in FACTS if x == self.key and y == o["key"]}):
                    if own and own[0] is o:
                        continue
                    if own:
                        subject = arg(own[0])
                    elif index % 2:
                        subject = {"boundaries": None, "surfaceform": self.key,
                                   "uri": ENTITY + E[self.key][0], "annotator": "NoSubject"}
                    else:
                        subject = arg(first)
                    nosubj.append(triple(sid, subject, p, arg(o), "NoSubject-Triple-aligner"))
        return nosubj + simple + spo


def country_document(row, rng: random.Random, index: int) -> dict:
    country, _, capital, _, continents, languages, currency, borders, orgs = row
    w = Writer(country)
    it = ("pronoun", country, "It")
    if continents:
        w.sentence(rng.choice(T_COUNTRY_OPEN), {"X": country, "C": list(continents)})
    else:
        w.sentence(T_COUNTRY_OPEN_NOCONT[0], {"X": country})
    body = []
    pick = rng.choice(T_CAPITAL + T_CAPITAL_NOSUBJ)
    body.append((pick, {"X": country, "Y": capital, "It": it}))
    if len(languages) >= 2:
        body.append((rng.choice(T_LANGUAGE2), {"X": country, "Y": languages[0], "Z": languages[1]}))
        for extra in languages[2:]:
            body.append((rng.choice(T_LANGUAGE[:2]), {"X": country, "Y": extra, "It": it}))
    elif languages:
        body.append((rng.choice(T_LANGUAGE), {"X": country, "Y": languages[0], "It": it}))
    if currency:
        body.append((rng.choice(T_CURRENCY + T_CURRENCY_NOSUBJ),
                     {"X": country, "Y": currency, "It": it}))
    borders = borders[:4]  # a document names at most four neighbours
    if borders:
        chunk = 2 if len(borders) > 3 else len(borders)
        for i in range(0, len(borders), chunk):
            body.append((rng.choice(T_BORDER), {"X": country, "L": borders[i:i + chunk], "It": it}))
    if orgs:
        body.append((rng.choice(T_MEMBER), {"X": country, "L": list(orgs), "It": it}))
    rng.shuffle(body)
    for template, slots in body:
        if "{It}" in template and not w.sentences:
            template = template.replace("{It}", "{X}")
        w.sentence(template, slots)
    return w.document(index)


def city_document(row, rng: random.Random, index: int) -> dict:
    country, _, capital, *_ = row
    w = Writer(capital)
    w.sentence(rng.choice(T_CITY_OPEN), {"X": capital, "Y": country})
    if capital.startswith(country + " "):  # "Mexico City": linkers also tag the nested "Mexico"
        w.add_mention("entity", country, country, 0, 0)
    if capital in TWINS:
        w.sentence("{X} is twinned with {Y}.", {"X": capital, "Y": TWINS[capital]})
    w.sentence(rng.choice(["It is the capital of {Y}.", "{X} is the capital of {Y}.",
                           "As the capital of {Y}, {X} is its political centre."]),
               {"X": capital, "Y": country, "It": ("pronoun", capital, "It")})
    return w.document(index)


def person_document(row, rng: random.Random, index: int) -> dict:
    name, _, pronoun, (birthplace, iso, date_surface), deathplace, citizenships, occupations = row
    w = Writer(name)
    it = ("pronoun", name, pronoun)
    article = "an" if occupations and occupations[0][0] in "aeiou" else "a"
    tense = "is" if name in LIVING else "was"
    if occupations and len(citizenships) == 1:
        template = rng.choice(T_PERSON_OPEN_CITIZEN).replace("{a}", article)
        template = template.replace(" was ", f" {tense} ", 1)
        w.sentence(template, {"X": name, "L": list(occupations), "Y": citizenships[0]})
        citizenships = []
    elif occupations:
        template = rng.choice(T_PERSON_OPEN).replace("{a}", article)
        template = template.replace(" was ", f" {tense} ", 1).replace("is remembered as", "is known as")
        w.sentence(template, {"X": name, "L": list(occupations)})
    else:
        w.sentence("{X} was a Swedish scientist.", {"X": name})
    body = []
    date = ("date", iso, date_surface) if iso else None
    if birthplace and date and rng.random() < 0.5:
        body.append((rng.choice(T_BIRTH_DATE), {"X": name, "Y": birthplace, "D": date, "It": it}))
    else:
        if birthplace:
            country = CITY_COUNTRY.get(birthplace) or next(
                (r[0] for r in COUNTRIES if r[2] == birthplace), None)
            template = rng.choice(T_BIRTH)
            if "{Z}" in template and not country:
                template = T_BIRTH[0]
            body.append((template, {"X": name, "Y": birthplace, "Z": country, "It": it}))
        if date:
            body.append((T_DATE_ONLY[0], {"X": name, "D": date}))
    if deathplace:
        country = CITY_COUNTRY.get(deathplace) or next(
            (r[0] for r in COUNTRIES if r[2] == deathplace), None)
        template = rng.choice(T_DEATH)
        if "{Z}" in template and not country:
            template = "{X} died in {Y}."
        body.append((template, {"X": name, "Y": deathplace, "Z": country, "It": it}))
    if len(citizenships) == 2:
        body.append((rng.choice(T_CITIZEN2), {"X": name, "Y": citizenships[0], "Z": citizenships[1],
                                              "It": it}))
    elif citizenships:
        body.append((rng.choice(T_CITIZEN), {"X": name, "Y": citizenships[0], "It": it}))
    rng.shuffle(body)
    for template, slots in body:
        w.sentence(template, slots)
    return w.document(index)


CITY_DOCUMENTS = {"France", "Germany", "Italy", "Austria", "Czech Republic", "Japan", "Mexico",
                  "Argentina", "Egypt", "Canada", "Ireland", "Denmark"}


def main() -> None:
    rng = random.Random(20240611)
    european = [r for r in COUNTRIES if r[4] and r[4][0] == "Europe"]
    others = [r for r in COUNTRIES if r not in european]
    files = {
        "countries-europe.json": [country_document(r, rng, i) for i, r in enumerate(european)],
        "countries-world.json": [country_document(r, rng, i) for i, r in enumerate(others)]
        + [city_document(r, rng, i + 1) for i, r in enumerate(
            r for r in COUNTRIES if r[0] in CITY_DOCUMENTS)],
        "people-1.json": [person_document(r, rng, i) for i, r in enumerate(PEOPLE[:18])],
        "people-2.json": [person_document(r, rng, i) for i, r in enumerate(PEOPLE[18:])],
    }
    for name, docs in files.items():
        for doc in docs:  # self-check: every boundary is exact
            for m in doc["entities"]:
                a, b = m["boundaries"]
                assert doc["text"][a:b] == m["surfaceform"], (doc["title"], m)
        body = ",\n".join(json.dumps(doc, ensure_ascii=False) for doc in docs)
        (HERE / name).write_text(f"[\n{body}\n]\n", encoding="utf-8")
        print(f"{name}: {len(docs)} documents")


if __name__ == "__main__":
    main()
