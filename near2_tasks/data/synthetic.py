"""A deterministic synthetic catalog with graded judgments: the embedded default data.

It looks like a home-improvement store: products have a type (``cordless drill``), a brand, a few
attributes, a model number (``DCD771C2``), a category path and a price. Queries come in three slices
the evaluation reports separately:

* short: the product type alone (``drill``, ``cordless drill``);
* alphanumeric: a model number, alone or with the brand (``DCD771C2``, ``makita xfd131``);
* long: brand, attributes and type in a sentence (``20v brushless cordless drill by dewalt``).

Grades follow the Home Depot scale (1 irrelevant .. 3 exact): the product itself or its exact type
scores 3, same-category products 2, others judged 1. Each query judges about ten products.

Same arguments, same output, on every machine (``random.Random(seed)``, no global state).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pandas as pd

# product type -> (category path, attribute choices, price range)
PRODUCT_TYPES: dict[str, tuple[str, list[str], tuple[float, float]]] = {
    "cordless drill": ("Tools > Power Tools > Drills", ["20V", "18V", "12V", "brushless", "compact"], (59, 249)),
    "hammer drill": ("Tools > Power Tools > Drills", ["1/2 in.", "corded", "20V", "variable speed"], (79, 299)),
    "impact driver": ("Tools > Power Tools > Drivers", ["1/4 in.", "20V", "brushless", "3-speed"], (69, 229)),
    "circular saw": ("Tools > Power Tools > Saws", ["7-1/4 in.", "15 Amp", "cordless", "worm drive"], (49, 259)),
    "miter saw": ("Tools > Power Tools > Saws", ["10 in.", "12 in.", "sliding", "compound"], (149, 699)),
    "reciprocating saw": ("Tools > Power Tools > Saws", ["cordless", "12 Amp", "variable speed"], (59, 219)),
    "claw hammer": ("Tools > Hand Tools > Hammers", ["16 oz.", "20 oz.", "fiberglass", "steel"], (9, 49)),
    "screwdriver set": ("Tools > Hand Tools > Screwdrivers", ["6-piece", "10-piece", "magnetic", "insulated"], (12, 59)),
    "adjustable wrench": ("Tools > Hand Tools > Wrenches", ["8 in.", "10 in.", "12 in.", "chrome"], (9, 39)),
    "tape measure": ("Tools > Hand Tools > Measuring", ["25 ft.", "16 ft.", "35 ft.", "magnetic"], (7, 35)),
    "led light bulb": ("Lighting > Light Bulbs", ["60-Watt equivalent", "soft white", "daylight", "dimmable"], (3, 25)),
    "ceiling fan": ("Lighting > Ceiling Fans", ["52 in.", "44 in.", "indoor", "with light kit"], (69, 399)),
    "pendant light": ("Lighting > Pendant Lights", ["1-light", "3-light", "brushed nickel", "black"], (39, 249)),
    "kitchen faucet": ("Bath & Kitchen > Kitchen Faucets", ["pull-down", "single-handle", "stainless", "touchless"], (79, 399)),
    "shower head": ("Bath & Kitchen > Showerheads", ["rain", "handheld", "6-spray", "chrome"], (19, 149)),
    "toilet": ("Bath & Kitchen > Toilets", ["elongated", "round", "dual flush", "1.28 GPF"], (99, 499)),
    "bathroom vanity": ("Bath & Kitchen > Vanities", ["30 in.", "48 in.", "white", "with top"], (199, 999)),
    "interior paint": ("Paint > Interior Paint", ["1 gal.", "eggshell", "satin", "semi-gloss"], (19, 59)),
    "deck stain": ("Paint > Exterior Stain", ["1 gal.", "semi-transparent", "solid color", "waterproofing"], (25, 69)),
    "paint roller": ("Paint > Paint Tools", ["9 in.", "3/8 in. nap", "microfiber", "frame"], (4, 19)),
    "lawn mower": ("Outdoor > Lawn Mowers", ["21 in.", "self-propelled", "gas", "cordless"], (229, 699)),
    "string trimmer": ("Outdoor > Trimmers", ["40V", "gas", "straight shaft", "cordless"], (79, 249)),
    "leaf blower": ("Outdoor > Leaf Blowers", ["cordless", "gas", "backpack", "handheld"], (69, 349)),
    "garden hose": ("Outdoor > Watering", ["50 ft.", "100 ft.", "5/8 in.", "kink-free"], (19, 79)),
    "patio chair": ("Outdoor > Patio Furniture", ["wicker", "steel", "stackable", "cushioned"], (39, 249)),
    "wood screws": ("Hardware > Fasteners", ["#8 x 2 in.", "#10 x 3 in.", "1 lb.", "star drive"], (6, 29)),
    "door hinge": ("Hardware > Door Hardware", ["3-1/2 in.", "satin nickel", "oil-rubbed bronze", "2-pack"], (4, 19)),
    "door knob": ("Hardware > Door Hardware", ["privacy", "passage", "keyed entry", "satin nickel"], (12, 49)),
    "smoke detector": ("Electrical > Safety", ["hardwired", "battery", "combination", "10-year"], (12, 59)),
    "extension cord": ("Electrical > Cords", ["25 ft.", "50 ft.", "outdoor", "16/3"], (9, 49)),
    "light switch": ("Electrical > Switches", ["single pole", "3-way", "dimmer", "white"], (3, 39)),
    "water heater": ("Plumbing > Water Heaters", ["40 gal.", "50 gal.", "tankless", "electric"], (399, 1499)),
    "pvc pipe": ("Plumbing > Pipe", ["1/2 in.", "3/4 in.", "10 ft.", "schedule 40"], (3, 25)),
    "refrigerator": ("Appliances > Refrigerators", ["French door", "25 cu. ft.", "stainless steel", "side by side"], (899, 2999)),
    "microwave": ("Appliances > Microwaves", ["over the range", "1.9 cu. ft.", "countertop", "convection"], (99, 599)),
    "dishwasher": ("Appliances > Dishwashers", ["24 in.", "stainless steel tub", "quiet", "top control"], (399, 1199)),
    "vinyl flooring": ("Flooring > Vinyl", ["luxury plank", "waterproof", "click lock", "oak look"], (1, 6)),
    "carpet tile": ("Flooring > Carpet", ["24 in. x 24 in.", "commercial", "gray", "peel and stick"], (1, 5)),
    "storage shelf": ("Storage > Shelving", ["5-tier", "steel", "wire", "48 in. W"], (39, 199)),
    "tool chest": ("Storage > Tool Storage", ["26 in.", "rolling", "5-drawer", "steel"], (99, 499)),
}

BRANDS = [
    "DeWalt", "Milwaukee", "Makita", "Ryobi", "Bosch", "Husky", "Stanley", "Klein", "Philips", "Hampton Bay",
    "Moen", "Delta", "Kohler", "Glacier Bay", "Behr", "Glidden", "Toro", "Ego", "Greenworks", "Everbilt",
    "Kidde", "Leviton", "Rheem", "Samsung", "Whirlpool", "LG", "Lifeproof", "TrafficMaster", "HDX", "Gladiator",
]

LONG_TEMPLATES = [
    "{attr} {type} by {brand}",
    "{brand} {attr} {type} for home use",
    "best {attr} {type} from {brand} brand",
    "need a {attr} {type} {brand} with good reviews",
]


@dataclass(frozen=True)
class SyntheticData:
    products: pd.DataFrame  # product_id, title, category, brand, price
    judgments: pd.DataFrame  # query_id, query, product_id, relevance


def _model_number(rng: random.Random, brand: str) -> str:
    letters = "".join(ch for ch in brand.upper() if ch.isalpha())[:2]
    return f"{letters}{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}{rng.randint(100, 9999)}{rng.choice(['', 'B', 'C2', 'K', 'Z'])}"


def generate_catalog(n_products: int = 2000, n_queries: int = 300, seed: int = 7) -> SyntheticData:
    """Products and graded judgments; identical for identical arguments."""
    rng = random.Random(seed)
    types = list(PRODUCT_TYPES)
    rows = []
    seen_titles: set[str] = set()
    for i in range(n_products):
        ptype = types[i % len(types)] if i < len(types) else rng.choice(types)
        category, attrs, (lo, hi) = PRODUCT_TYPES[ptype]
        brand = rng.choice(BRANDS)
        chosen = rng.sample(attrs, k=rng.randint(1, min(2, len(attrs))))
        model_no = _model_number(rng, brand)
        title = f"{brand} {' '.join(chosen)} {ptype.title()} {model_no}"
        while title in seen_titles:  # model numbers make collisions rare; keep titles unique anyway
            model_no = _model_number(rng, brand)
            title = f"{brand} {' '.join(chosen)} {ptype.title()} {model_no}"
        seen_titles.add(title)
        rows.append({
            "product_id": str(100000 + i),
            "title": title,
            "category": category,
            "brand": brand,
            "price": round(rng.uniform(lo, hi), 2),
            "_type": ptype,
            "_attrs": chosen,
            "_model": model_no,
        })
    products = pd.DataFrame(rows)

    by_type = products.groupby("_type").indices
    by_category = products.groupby("category").indices
    judgments = []
    for q in range(n_queries):
        kind = ("short", "alphanumeric", "long")[q % 3]
        anchor = products.iloc[rng.randrange(len(products))]
        ptype, category = anchor["_type"], anchor["category"]
        if kind == "short":
            words = ptype.split()
            query = ptype if rng.random() < 0.6 else words[-1]
            exact = set(by_type[ptype]) if query == ptype else {
                i for t, idx in by_type.items() if t.split()[-1] == query for i in idx
            }
        elif kind == "alphanumeric":
            query = anchor["_model"] if rng.random() < 0.6 else f"{anchor['brand']} {anchor['_model']}"
            query = query.lower() if rng.random() < 0.5 else query
            exact = {int(anchor.name)}
        else:
            attr = rng.choice(anchor["_attrs"])
            query = rng.choice(LONG_TEMPLATES).format(attr=attr, type=ptype, brand=anchor["brand"]).lower()
            exact = {
                i for i in by_type[ptype]
                if products.at[i, "brand"] == anchor["brand"] and attr in products.at[i, "_attrs"]
            }
        partial = set(by_category[category]) - exact
        others = [i for i in rng.sample(range(len(products)), k=min(40, len(products)))
                  if i not in exact and i not in partial]
        judged: dict[int, float] = {}
        for i in rng.sample(sorted(exact), k=min(4, len(exact))):
            judged[i] = 3.0
        for i in rng.sample(sorted(partial), k=min(3, len(partial))):
            judged[i] = rng.choice([2.0, 2.33, 2.67])
        for i in others[:3]:
            judged[i] = rng.choice([1.0, 1.33])
        for i, rel in judged.items():
            judgments.append({
                "query_id": f"q{q:05d}",
                "query": query,
                "product_id": products.at[i, "product_id"],
                "relevance": rel,
            })
    public = products[["product_id", "title", "category", "brand", "price"]].copy()
    return SyntheticData(products=public, judgments=pd.DataFrame(judgments))


def write_catalog(directory, n_products: int = 2000, n_queries: int = 300, seed: int = 7):
    """Write ``products.csv`` and ``judgments.csv`` into ``directory``; return their paths."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = generate_catalog(n_products, n_queries, seed)
    catalog, judgments = directory / "products.csv", directory / "judgments.csv"
    data.products.to_csv(catalog, index=False)
    data.judgments.to_csv(judgments, index=False)
    return catalog, judgments
