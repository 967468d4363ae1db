"""A witness at the keyboard: a person answers the trained questioner, in a browser
(``llava-reid demo``) or a terminal (``llava-reid chat``), through the evaluation's dialogue
engine, and the session is saved as dialogue rows that score like an evaluation's."""
