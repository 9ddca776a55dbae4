"""OpenAI grader import: grader JSON plus dataset items into governed scenario files."""
