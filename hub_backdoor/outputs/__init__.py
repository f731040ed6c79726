"""What a job leaves behind: the model card (:mod:`.card`), SARIF for code scanning (:mod:`.sarif`)
and the purified model's folder and Hub push (:mod:`.publish`).

The last stage of the library; only the workflow layer (:mod:`hub_backdoor.jobs`) and the front ends
import it.
"""
