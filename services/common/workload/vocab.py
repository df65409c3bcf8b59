"""Word lists the generators draw names, places and things from."""
from __future__ import annotations

FIRST_NAMES = (
    "Maria", "John", "Aisha", "Pierre", "Yuki", "Carlos", "Emma", "Liam", "Sofia", "Noah",
    "Olga", "Ahmed", "Chen", "Fatima", "Lucas", "Mia", "Ravi", "Anna", "Omar", "Elena",
    "David", "Sara", "Kenji", "Laura", "Ivan", "Zoe", "Mateo", "Hannah", "Tariq", "Julia",
)
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Dubois", "Tanaka", "Silva", "Brown", "Murphy", "Rossi", "Novak",
    "Petrov", "Haddad", "Wang", "Okafor", "Martin", "Schmidt", "Patel", "Berg", "Costa", "Meyer",
    "Garcia", "Kim", "Nguyen", "Jansen", "Ali", "Moreau", "Fischer", "Larsen", "Sato", "Cohen",
)
CITIES = (
    "Lyon", "Berlin", "Osaka", "Lima", "Cairo", "Dublin", "Oslo", "Porto", "Austin", "Nairobi",
    "Seoul", "Vienna", "Quito", "Perth", "Madrid", "Boston", "Delhi", "Prague", "Denver", "Milan",
    "Lisbon", "Toronto", "Hanoi", "Geneva", "Krakow", "Dakar", "Bergen", "Leeds", "Tunis", "Riga",
)
JOBS = (
    "nurse", "teacher", "pilot", "baker", "lawyer", "chemist", "plumber", "designer", "farmer",
    "engineer", "dentist", "librarian", "chef", "journalist", "carpenter", "pharmacist",
    "architect", "electrician", "translator", "painter",
)
ITEMS = (
    "apple", "pencil", "marble", "cookie", "book", "sticker", "card", "stamp", "shell", "coin",
    "ball", "cupcake", "flower", "ticket", "balloon", "candle", "button", "orange", "toy", "egg",
)
PRODUCTS = (
    "lamps", "chairs", "kettles", "helmets", "backpacks", "umbrellas", "blenders", "scarves",
    "laptops", "mugs", "tents", "jackets", "watches", "bicycles", "speakers", "cameras",
    "sneakers", "pillows", "candles", "notebooks",
)
WORDS = (
    "anchor", "bamboo", "candle", "dragon", "eagle", "falcon", "garden", "harbor", "island",
    "jacket", "kettle", "lemon", "marble", "needle", "orange", "pepper", "quartz", "rabbit",
    "saddle", "tomato", "umpire", "velvet", "walnut", "yogurt", "zipper", "apple", "bridge",
    "cactus", "donkey", "engine", "forest", "guitar", "hammer", "igloo", "jungle", "kitten",
    "ladder", "mirror", "nickel", "oyster", "pillow", "quiver", "ribbon", "salmon", "tunnel",
    "violin", "window", "yellow", "zebra", "arrow", "basket", "carrot", "desert", "feather",
    "ginger", "helmet", "insect", "jigsaw", "koala", "lizard", "magnet", "napkin", "onion",
    "parrot", "rocket", "silver", "turtle", "valley", "wallet", "button", "cherry", "dolphin",
    "finger", "goblet", "hornet", "lantern", "meadow", "noodle", "pebble", "river", "spider",
    "thunder", "muffin", "planet", "castle", "garlic", "honey", "lobster", "mango", "otter",
    "pirate", "saturn", "tiger", "volcano", "wizard", "acorn", "beetle", "cotton", "piano",
)
