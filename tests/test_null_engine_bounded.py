"""The null engine stands in for the model in `bench gateway` runs of many minutes: what it
records for tests must stay bounded, and a closed session must leave nothing behind."""
import time

from omni2.streaming.engine.messages import TurnDone, TurnRequest
from omni2.streaming.engine.null_engine import RECORDS, NullEngine


def test_records_stay_bounded_and_closed_sessions_leave_no_context():
    engine = NullEngine(slots=4, tick_s=0.001, answer_words=1).start()
    try:
        for i in range(RECORDS + 50):
            sid = engine.open_session()
            engine.submit(TurnRequest(sid, text=f"q{i}", answer=False))  # context only: done at once
            engine.close_session(sid)
        assert len(engine.submitted) == RECORDS and len(engine.prompts) <= RECORDS
        assert engine.submitted[-1].text == f"q{RECORDS + 49}"           # the newest are kept
        assert engine.context == {}
        sid = engine.open_session()
        turn = engine.submit(TurnRequest(sid, text="closed while it talks"))
        engine.close_session(sid)                                        # the answer ends after the close
        assert isinstance(list(turn.events(timeout=5))[-1], TurnDone)
        time.sleep(0.05)
        assert engine.context == {} and engine._thread.is_alive()
    finally:
        engine.stop()
