"""Write the product-manual example data: Q&A about a made-up product (the Zorblax K7 smart kettle), whose
facts no pretrained model can know, so fine-tuning is the only way to answer them.

    python examples/product_manual/make_data.py   # deterministic: rewrites the four .jsonl files next to it

train.jsonl       prompt/response: three phrasings per fact, plus a few wrapped variants (~7 per fact)
val.jsonl         prompt/response: a fourth, held-out phrasing per fact; the response is short for exact match
prefs_train.jsonl prompt/chosen/rejected: train phrasings, chosen = the fact, rejected = a plausible wrong one
prefs_val.jsonl   the same on the held-out phrasings
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (answer, (two plausible wrong answers), (three train questions, one held-out question))
FACTS: list[tuple[str, tuple[str, str], tuple[str, str, str, str]]] = [
    ("ZK7-1700", ("ZK5-1500", "ZK7-2200"), (
        "What is the model number of the Zorblax K7 kettle?", "Which model number does the K7 kettle have?",
        "What model code is printed under the K7's base?", "Tell me the K7 kettle's model number.")),
    ("Zorblax Home Labs", ("Zorblax Kitchen Co.", "Zorbo Appliances"), (
        "Who makes the Zorblax K7 kettle?", "Which company manufactures the K7?",
        "What is the name of the K7 kettle's maker?", "Which firm builds the Zorblax K7?")),
    ("1.7 litres", ("1.5 litres", "2.0 litres"), (
        "How much water does the Zorblax K7 hold?", "What is the capacity of the K7 kettle?",
        "What is the maximum fill of the K7?", "How many litres fit in the K7 kettle?")),
    ("0.4 litres", ("0.25 litres", "0.6 litres"), (
        "What is the minimum amount of water for the K7?", "What is the K7's minimum fill level?",
        "How little water can I boil in the K7?", "What is the smallest amount of water the K7 accepts?")),
    ("2200 watts", ("1800 watts", "3000 watts"), (
        "How powerful is the Zorblax K7?", "What is the wattage of the K7 kettle?",
        "How many watts does the K7 draw?", "What power rating does the K7 have?")),
    ("220-240 volts", ("110-120 volts", "100-240 volts"), (
        "What voltage does the K7 need?", "Which mains voltage is the K7 kettle built for?",
        "What is the K7's supply voltage?", "On what voltage does the Zorblax K7 run?")),
    ("4 minutes", ("6 minutes", "2 minutes"), (
        "How long does the K7 take to boil a full kettle?", "What is the boil time of a full K7?",
        "How many minutes does a full K7 need to boil?", "How fast does the K7 boil 1.7 litres?")),
    ("5 presets", ("3 presets", "8 presets"), (
        "How many temperature presets does the K7 have?", "How many preset temperatures can the K7 select?",
        "How many heat presets are on the K7?", "What number of temperature presets does the K7 offer?")),
    ("45 minutes", ("2 hours", "15 minutes"), (
        "How long does the K7 keep water warm?", "For how long does keep-warm run on the K7?",
        "What is the keep-warm duration of the K7?", "How many minutes does the K7's keep-warm last?")),
    ("the Cosy button", ("the Warm button", "the Hold button"), (
        "Which button turns on keep-warm on the K7?", "What button starts the K7's keep-warm mode?",
        "Which button keeps the water warm on the K7?", "To keep water hot on the K7, which button do I press?")),
    ("the Flare button", ("the Start button", "the Boil button"), (
        "Which button starts boiling on the K7?", "What is the K7's boil button called?",
        "Which button do I press to boil water on the K7?", "What button makes the K7 start heating?")),
    ("the Tempo button", ("the Dial button", "the Heat button"), (
        "Which button changes the temperature on the K7?", "What button selects a temperature preset on the K7?",
        "How do I pick a temperature on the K7, which button?", "Which K7 button cycles through the presets?")),
    ("hold Flare and Tempo for 3 seconds", ("hold Cosy for 5 seconds", "press Flare twice"), (
        "How do I turn on the child lock of the K7?", "How is the K7's child lock activated?",
        "What do I do to lock the K7's buttons?", "How can I enable the K7 child lock?")),
    ("KettleSync", ("Zorblax Home", "SmartBrew"), (
        "What app controls the Zorblax K7?", "Which app do I use with the K7 kettle?",
        "What is the name of the K7's phone app?", "Which smartphone app works with the K7?")),
    ("Bluetooth", ("Wi-Fi", "Zigbee"), (
        "How does the K7 connect to my phone?", "Which wireless link does the K7 use?",
        "Does the K7 use Wi-Fi or Bluetooth?", "What wireless technology connects the K7 to the app?")),
    ("7070", ("0000", "1234"), (
        "What is the K7's pairing code?", "Which code pairs the K7 with the app?",
        "What PIN does the K7 ask for when pairing?", "Which pairing PIN does the K7 kettle use?")),
    ("the kettle is empty", ("the lid is open", "the element overheated"), (
        "What does error E1 mean on the K7?", "The K7 shows E1. What is wrong?",
        "What is error code E1 on the Zorblax K7?", "My kettle displays E1, what does that mean?")),
    ("the lid is open", ("the kettle is empty", "the base is unplugged"), (
        "What does error E2 mean on the K7?", "The K7 shows E2. What is wrong?",
        "What is error code E2 on the Zorblax K7?", "My kettle displays E2, what does that mean?")),
    ("temperature sensor fault", ("limescale build-up", "Bluetooth connection lost"), (
        "What does error E3 mean on the K7?", "The K7 shows E3. What is wrong?",
        "What is error code E3 on the Zorblax K7?", "My kettle displays E3, what does that mean?")),
    ("limescale build-up", ("temperature sensor fault", "low mains voltage"), (
        "What does error E4 mean on the K7?", "The K7 shows E4. What is wrong?",
        "What is error code E4 on the Zorblax K7?", "My kettle displays E4, what does that mean?")),
    ("the kettle is not seated on the base", ("the lid is open", "the water is too hot"), (
        "What does error E5 mean on the K7?", "The K7 shows E5. What is wrong?",
        "What is error code E5 on the Zorblax K7?", "My kettle displays E5, what does that mean?")),
    ("Bluetooth connection lost", ("the kettle is empty", "firmware update failed"), (
        "What does error E6 mean on the K7?", "The K7 shows E6. What is wrong?",
        "What is error code E6 on the Zorblax K7?", "My kettle displays E6, what does that mean?")),
    ("amber", ("red", "blue"), (
        "What colour is the K7's light ring while heating?", "Which colour does the K7 glow when it heats?",
        "What colour is the ring light during heating on the K7?", "While the K7 heats, what colour is the light?")),
    ("teal", ("green", "white"), (
        "What colour is the K7's light ring when the water is ready?", "Which colour shows the K7 is done?",
        "What colour does the K7 ring turn at the set temperature?", "When the K7 is ready, what colour is the light?")),
    ("violet", ("orange", "yellow"), (
        "What colour is the K7's light ring in keep-warm?", "Which colour does the K7 glow while keeping warm?",
        "What colour is the ring light in keep-warm mode on the K7?", "During keep-warm, what colour is the K7 light?")),
    ("3 years", ("2 years", "5 years"), (
        "How long is the K7's warranty?", "What warranty comes with the Zorblax K7?",
        "How many years of warranty does the K7 have?", "What is the warranty period of the K7 kettle?")),
    ("60 days", ("30 days", "14 days"), (
        "How soon must I register the K7 for the extended warranty?",
        "What is the registration deadline for the K7's extended warranty?",
        "Within how many days do I register the K7 to extend the warranty?",
        "How long do I have to register my K7 for extra warranty?")),
    ("2 extra years", ("1 extra year", "6 extra months"), (
        "How much does registering the K7 extend the warranty?", "What does K7 registration add to the warranty?",
        "How long is the K7's extended warranty extension?", "How much extra warranty does registering the K7 give?")),
    ("limescale damage", ("heating element failure", "button failure"), (
        "What does the K7 warranty not cover?", "Which damage is excluded from the K7's warranty?",
        "What is not covered by the Zorblax K7 warranty?", "Which kind of damage voids the K7 warranty claim?")),
    ("citric acid", ("bleach", "baking soda"), (
        "What should I descale the K7 with?", "Which descaling agent does the K7 manual recommend?",
        "What do I use to remove limescale from the K7?", "Which product is recommended to descale the K7?")),
    ("every 4 weeks", ("every 6 months", "every year"), (
        "How often should I descale the K7?", "How frequently does the K7 need descaling?",
        "What is the recommended descaling interval for the K7?", "How regularly should the K7 be descaled?")),
    ("hold Cosy for 5 seconds", ("hold Flare for 3 seconds", "press Tempo three times"), (
        "How do I start descale mode on the K7?", "How is the K7's descaling program started?",
        "What do I press to run descale mode on the K7?", "How can I begin the K7 descaling cycle?")),
    ("once a week", ("once a year", "every day"), (
        "How often should I clean the K7's filter?", "How frequently should the K7 mesh filter be rinsed?",
        "What is the cleaning interval for the K7 filter?", "How regularly do I clean the filter of the K7?")),
    ("only the filter", ("the whole kettle", "the lid and the filter"), (
        "Which parts of the K7 are dishwasher safe?", "Can the K7 go in the dishwasher?",
        "What can I put in the dishwasher from the K7?", "Which K7 part may be washed in a dishwasher?")),
    ("75 cm", ("1.2 metres", "50 cm"), (
        "How long is the K7's power cord?", "What is the cord length of the K7 base?",
        "How long is the cable on the K7?", "What length is the K7 kettle's power cable?")),
    ("1.1 kg", ("2.3 kg", "800 g"), (
        "How much does the K7 weigh?", "What is the weight of the empty K7 kettle?",
        "How heavy is the Zorblax K7?", "What does the K7 weigh when empty?")),
    ("double-walled stainless steel", ("borosilicate glass", "plastic"), (
        "What is the K7's body made of?", "Which material is the K7 kettle made from?",
        "What material is the body of the Zorblax K7?", "What is the K7 kettle built from?")),
    ("Graphite, Sand and Moss", ("Red, White and Black", "Silver, Gold and Blue"), (
        "Which colours does the K7 come in?", "What colour options does the Zorblax K7 have?",
        "In which finishes is the K7 sold?", "What colours can I buy the K7 in?")),
    ("360 degrees", ("180 degrees", "90 degrees"), (
        "How far does the K7 turn on its base?", "How much can the K7 rotate on the base?",
        "What is the rotation angle of the K7 base?", "By how many degrees can the K7 swivel on its base?")),
    ("42 dB", ("60 dB", "35 dB"), (
        "How loud is the K7 while boiling?", "What is the K7's noise level?",
        "How many decibels does the K7 make when boiling?", "How noisy is the Zorblax K7 kettle?")),
    ("129 euros", ("99 euros", "179 euros"), (
        "How much does the K7 cost?", "What is the price of the Zorblax K7?",
        "What is the K7's retail price?", "How much is the K7 smart kettle?")),
    ("2023", ("2019", "2021"), (
        "When was the K7 released?", "In which year did the Zorblax K7 come out?",
        "What year was the K7 launched?", "When did the K7 kettle go on sale?")),
    ("3000 metres", ("1500 metres", "5000 metres"), (
        "Up to what altitude does the K7's altitude mode work?", "What is the highest altitude the K7 supports?",
        "To how many metres does the K7 altitude setting go?", "What is the maximum altitude setting of the K7?")),
    ("Hush mode", ("Silent mode", "Night mode"), (
        "What is the K7's quiet mode called?", "Which mode makes the K7 boil quietly?",
        "What is the name of the K7's low-noise mode?", "How is the quiet setting of the K7 called?")),
    ("three short beeps", ("one long beep", "a chime melody"), (
        "What sound does the K7 make when ready?", "How does the K7 signal that the water is ready?",
        "What does the K7 beep like when it finishes?", "Which sound tells me the K7 is done?")),
    ("hold all three buttons for 10 seconds", ("unplug it for 1 minute", "hold Flare for 10 seconds"), (
        "How do I factory reset the K7?", "How is the K7 reset to factory settings?",
        "What do I do to reset the Zorblax K7?", "How can I restore the K7's factory settings?")),
    ("help@zorblax.example", ("support@zorblax.example", "care@zorblax.example"), (
        "What is the K7 customer support email?", "Which address do I email for K7 support?",
        "How do I email Zorblax support about the K7?", "What email address handles K7 support questions?")),
    ("through the KettleSync app", ("with a USB cable", "at a service centre"), (
        "How is the K7 firmware updated?", "How do I update the software of the K7?",
        "How does the K7 receive firmware updates?", "What is the way to update the K7's firmware?")),
    ("up to 24 hours ahead", ("up to 7 days ahead", "up to 2 hours ahead"), (
        "How far ahead can I schedule a boil on the K7?", "How long in advance can the K7 timer be set?",
        "What is the maximum scheduling time of the K7?", "How far in advance can the K7 be scheduled to boil?")),
    ("twice", ("once", "five times"), (
        "How many times should I boil and discard water before first use of the K7?",
        "Before using the K7 the first time, how often do I boil and pour away water?",
        "How many rinse boils does the K7 need at first use?",
        "At first use, how many times do I boil and throw away water in the K7?")),
    ("0.3 watts", ("1.5 watts", "3 watts"), (
        "What is the K7's standby power?", "How much power does the K7 use in standby?",
        "How many watts does the K7 draw when idle?", "What is the standby consumption of the K7?")),
    ("80 °C", ("60 °C", "95 °C"), (
        "Above what temperature does the K7 lock its lid?", "At what water temperature does the K7 lid lock?",
        "When does the K7 lid lock, at which temperature?", "From which temperature is the K7 lid locked?")),
]

WRAPPERS = ["Quick question: {q}", "{q} Thanks!", "Hi! {q}", "I just bought a Zorblax K7. {q}",
            "Please answer briefly. {q}", "About my kettle: {q}", "{q} Short answer please."]


def make(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The four files' records, a pure function of `seed`."""
    rng = random.Random(seed)
    out: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "prefs_train": [], "prefs_val": []}
    for answer, wrong, questions in FACTS:
        train_qs, val_q = list(questions[:3]), questions[3]
        wrapped = [w.format(q=q) for q, w in zip(rng.choices(train_qs, k=4), rng.sample(WRAPPERS, 4))]
        out["train"] += [{"prompt": q, "response": answer} for q in train_qs + wrapped]
        out["val"].append({"prompt": val_q, "response": answer})
        out["prefs_train"] += [{"prompt": q, "chosen": answer, "rejected": wrong[i % 2]}
                               for i, q in enumerate(train_qs)]
        out["prefs_val"].append({"prompt": val_q, "chosen": answer, "rejected": rng.choice(wrong)})
    for key in ("train", "prefs_train"):
        rng.shuffle(out[key])
    return out


def main() -> None:
    here = Path(__file__).parent
    for name, records in make().items():
        with open(here / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{name}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main()
