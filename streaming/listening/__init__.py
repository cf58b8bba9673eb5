"""The duplex listener: what the user says while an answer plays (speech detection, echo
cancelling, the "stop omni" command recognizer, the controller that combines them)."""
