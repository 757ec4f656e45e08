"""Test kits shipped to users: the history checker and (later) the conformance suite."""
